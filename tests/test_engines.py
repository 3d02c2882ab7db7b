"""The exported demo in real engines: llama.cpp (llama-cpp-python, built from its source distribution by the test
extra) loads the tiny base as GGUF plus the exported GGUF LoRA, and `transformers serve` answers a chat request.

The base GGUF is written by tests/gguf_base.py with the gguf package (llama.cpp's converter does not take the demo's
tokenizer). Without llama-cpp-python these tests fail and say why: they are the proof that the export runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from gguf_base import write_base_gguf
from openai_server import transformers_serve
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

from friction import gguf_export
from friction.chatml import CHAT_TEMPLATE, IM_START, THINK_OPEN, generation_prompt, render
from friction.tokens import end_of_turn_id, load_tokenizer

# llama.cpp computes in f32 with its own kernels; the docs measured 2.4e-4 for the base and 1.4e-4 with an adapter.
LOGITS_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        pytest.fail(
            f"llama-cpp-python is not importable ({error}). `make setup` installs it with the test extra "
            "(pyproject.toml), compiling llama.cpp from its source distribution: that needs gcc, g++ and "
            "cmake, and about 5 minutes on 2 cores the first time (pip caches the wheel)."
        )
    return llama_cpp


@pytest.fixture(scope="module")
def base_gguf(exported_demo, tmp_path_factory) -> Path:
    workspace, _ = exported_demo
    return write_base_gguf(workspace / "data/sources/demo-base", tmp_path_factory.mktemp("gguf") / "demo-base.gguf")


def llama(llama_cpp, model: Path, lora: Path | None = None, vocab_only: bool = False):
    return llama_cpp.Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        n_threads=2,
        seed=0,
        verbose=False,
        vocab_only=vocab_only,
    )


def training_prefixes(base_dir: Path, system_prompt: str) -> list[tuple[list[dict[str, str]], list[int]]]:
    """(prompt messages, the training ids up to the reply's opening `<think>` line) for the sample conversations."""
    training = load_tokenizer(base_dir, None)
    pairs = []
    for prompt, reply in gguf_export.sample_conversations(system_prompt):
        text = render([*prompt, *reply])
        opening = f"{IM_START}assistant\n{THINK_OPEN}\n"
        pairs.append((prompt, training(text[: text.rindex(opening) + len(opening)])["input_ids"]))
    return pairs


def modelfile_parts(out_dir: Path) -> tuple[str, str]:
    """(TEMPLATE, SYSTEM) of the exported Modelfile, as Ollama's parser reads the triple-quoted values."""
    modelfile = (out_dir / "Modelfile").read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.DOTALL | re.MULTILINE)[1]
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.DOTALL | re.MULTILINE)[1]
    return template, system


def test_llama_cpp_logits_match_transformers_and_peft(llama_cpp, exported_demo, base_gguf):
    workspace, _ = exported_demo
    base_dir, adapter_dir = workspace / "data/sources/demo-base", workspace / "models/friction-adapter"
    ids = training_prefixes(base_dir, "You are a human-like AI assistant.")[1][1]  # a two-turn conversation
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = base(torch.tensor([ids])).logits[0].numpy()
        hf_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(torch.tensor([ids])).logits[0].numpy()

    results = {}
    for name, lora in (("base", None), ("adapter", workspace / "models/friction-gguf/friction-lora-f16.gguf")):
        model = llama(llama_cpp, base_gguf, lora)
        model.eval(ids)
        results[name] = np.array(model.scores[: len(ids), : hf_base.shape[1]])
        model.close()
    moved = np.abs(hf_adapter - hf_base).max()
    base_error, adapter_error = np.abs(results["base"] - hf_base).max(), np.abs(results["adapter"] - hf_adapter).max()
    print(
        f"{len(ids)} positions: adapter moves logits by up to {moved:.3g}; llama.cpp vs transformers: base "
        f"{base_error:.2e}, base + adapter {adapter_error:.2e}"
    )
    assert base_error < LOGITS_TOLERANCE
    assert adapter_error < LOGITS_TOLERANCE
    assert moved > 10 * LOGITS_TOLERANCE  # the adapter changes the logits far more than the tolerance: a real check


def test_llama_cpp_tokenizes_the_rendered_templates_into_the_training_ids(llama_cpp, exported_demo, base_gguf):
    workspace, _ = exported_demo
    out = workspace / "models/friction-gguf"
    template, system = modelfile_parts(out)
    vocabulary = llama(llama_cpp, base_gguf, vocab_only=True)
    bos, eos = vocabulary.token_bos(), vocabulary.token_eos()
    jinja = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=(out / "chat_template.jinja").read_text(encoding="utf-8"),
        bos_token=vocabulary.detokenize([bos], special=True).decode(),
        eos_token=vocabulary.detokenize([eos], special=True).decode(),
    )
    for messages, training_ids in training_prefixes(workspace / "data/sources/demo-base", system):
        rendered = gguf_export.render_go_template(template, messages)
        # As llama.cpp and Ollama tokenize a prompt: BOS added (the GGUF's add_bos_token), special tokens parsed.
        assert vocabulary.tokenize(rendered.encode(), add_bos=True, special=True) == training_ids
        prompt = jinja(messages=messages).prompt
        assert prompt == rendered
        assert vocabulary.tokenize(prompt.encode(), add_bos=True, special=True) == training_ids
    assert training_ids[0] == bos and training_ids.count(eos) == 4  # BOS; EOS ending each of 4 turns before the reply
    vocabulary.close()


def test_transformers_serve_answers_with_the_adapter_template_and_eos(exported_demo, tmp_path):
    workspace, _ = exported_demo
    merged = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    merge = subprocess.run(
        ["friction", "merge", "--adapter", "models/friction-adapter", "--out", str(merged)],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert merge.returncode == 0, merge.stderr[-3000:]

    # What the server loads (transformers serve: AutoProcessor and the model's generation config from the folder).
    training = load_tokenizer(workspace / "data/sources/demo-base", None)
    processor = AutoProcessor.from_pretrained(merged)
    assert processor.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "You are a human-like AI assistant."},
        {"role": "user", "content": "Should I repaint the whole house this weekend?"},
    ]
    prompt_ids = training(generation_prompt(messages))["input_ids"]
    assert (
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        == prompt_ids
    )
    assert GenerationConfig.from_pretrained(merged).eos_token_id == end_of_turn_id(training)

    with transformers_serve(merged, tmp_path / "serve.log") as base_url:
        request = urllib.request.Request(
            f"{base_url}/chat/completions",
            data=json.dumps({"model": str(merged), "messages": messages, "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids)  # the server rendered the adapter's template
