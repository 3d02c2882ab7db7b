"""A probe the benchmarks put on PYTHONPATH: in a stage's process (`python -m stages NAME`) with FRICTION_BENCH_PROBE set to a file, it logs
- every text the fast tokenizer encodes, by sha256: every `tokenizer(...)`, `encode` and
  `apply_chat_template(tokenize=True)` goes through transformers' `TokenizersBackend._encode_plus`, and mix's
  batches through `friction.tokens.encode_texts` (FRICTION_BENCH_PROBE_HASHES=0 leaves the digests out);
- the seconds spent in `encode_texts` (the Rust tokenizer's encoding of mix's batches), and those evaluate spends in
  validation loss and in generation.
Anything else runs untouched; modules are patched only once they are imported.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from typing import Any

LOG = os.environ.get("FRICTION_BENCH_PROBE")
HASHES = os.environ.get("FRICTION_BENCH_PROBE_HASHES", "1") == "1"
STAGE_COMMAND = sys.orig_argv[1:3] == ["-m", "stages"]  # `python -m stages NAME ...`, as dvc.yaml runs a stage
STAGE = sys.orig_argv[3] if STAGE_COMMAND and len(sys.orig_argv) > 3 else ""


def log(record: dict[str, Any]) -> None:
    with open(LOG, "a", encoding="utf-8") as handle:  # type: ignore[arg-type]
        handle.write(json.dumps({"stage": STAGE, **record}) + "\n")


def texts_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    return []  # pre-tokenized input: no text is tokenized


def patch_tokenizer(module: Any) -> None:
    original = module.TokenizersBackend._encode_plus

    def counted(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        for item in texts_of(text):
            log({"tokenized": hashlib.sha256(item.encode()).hexdigest(), "chars": len(item)})
        return original(self, text, *args, **kwargs)

    module.TokenizersBackend._encode_plus = counted


def patch_encode_texts(module: Any) -> None:
    original = module.encode_texts

    def counted_and_timed(tokenizer: Any, texts: Any) -> Any:
        if HASHES:
            for item in texts:
                log({"tokenized": hashlib.sha256(item.encode()).hexdigest(), "chars": len(item)})
        start = time.perf_counter()
        encodings = original(tokenizer, texts)
        log({"timer": "encode_texts", "seconds": time.perf_counter() - start, "texts": len(texts)})
        return encodings

    module.encode_texts = counted_and_timed


def patch_evaluate(module: Any) -> None:
    # The stage computes validation loss example by example (example_losses, once per model); its timer keeps the name.
    for name, timer in (("example_losses", "validation_loss"), ("generate", "generate")):
        original = getattr(module, name)

        def timed(*args: Any, __original: Any = original, __name: str = timer, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = __original(*args, **kwargs)
            log({"timer": __name, "seconds": time.perf_counter() - start})
            return result

        setattr(module, name, timed)


PATCHES = {
    "transformers.tokenization_utils_tokenizers": patch_tokenizer,
    "friction.tokens": patch_encode_texts,
    "stages.evaluate": patch_evaluate,
}


class PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if LOG and STAGE_COMMAND:
    sys.meta_path.insert(0, PatchOnImport())
