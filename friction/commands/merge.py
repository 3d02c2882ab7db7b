"""`friction merge`: fold the adapter into its base (peft's merge_and_unload) as a model transformers loads alone.

A base stored in 4 bits (a bitsandbytes checkpoint such as unsloth's -bnb-4bit) cannot take the merged weights
exactly; it is loaded, dequantized to 16 bits, and merged there, so the result is a 16-bit model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch

from friction.adapter import base_reference, load_base, require_base, with_adapter
from friction.artifacts import atomic_output

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WRITTEN_LIST = "friction-merge.json"
"""Written into every merged folder: the names merge put there, so a later merge to the same --out can tell its own
folder (which it replaces whole) from a folder that holds anything else (which it refuses: it never deletes what it
did not write)."""


def written_by_merge(out: Path) -> set[str]:
    """The names a merge recorded writing in `out` (its list included); empty when `out` holds no valid list."""
    try:
        record = json.loads((out / WRITTEN_LIST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return set()
    return {*files, WRITTEN_LIST}


def check_out(out: Path) -> None:
    """Refuse an --out whose replacement would lose anything merge did not write. The merged model replaces its
    folder whole (atomically), so --out must be new, empty, or a folder an earlier merge wrote and nobody added to."""
    how = "give a new folder (--out merged, say), or move away what it holds"
    here = Path.cwd().resolve()
    if out.is_symlink():
        raise click.ClickException(f"--out {out}: is a link; merge replaces its folder whole: {how}")
    target = out.resolve()
    if target == here or here.is_relative_to(target):
        where = "the current folder" if target == here else "a folder above the current one"
        raise click.ClickException(f"--out {out}: is {where}; merge replaces its folder whole: {how}")
    if not out.exists():
        return
    if not out.is_dir():
        raise click.ClickException(f"--out {out}: is a file, not a folder: {how}")
    foreign = sorted(set(os.listdir(out)) - written_by_merge(out))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise click.ClickException(
            f"--out {out}: holds {listed}, which merge did not write; merge replaces its folder whole and never "
            f"deletes what it did not write: {how}"
        )


def stored_quantization(location: str, revision: str | None) -> str | None:
    """The quantization method the base checkpoint is stored in (e.g. bitsandbytes), or None for plain weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except OSError as error:
        raise click.ClickException(f"base model {location}: {error}") from None
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return str(method)


def run(folder: Path, out: Path, dtype_name: str | None) -> None:
    check_out(out)
    location, revision = base_reference(folder)
    require_base(location)
    quantized = stored_quantization(location, revision)
    dtype = DTYPES[dtype_name] if dtype_name else (torch.bfloat16 if quantized else "auto")
    if quantized:
        if not torch.cuda.is_available():
            raise click.ClickException(
                f"base model {location} is stored {quantized}-quantized; loading it to "
                "dequantize needs a CUDA GPU (or merge onto the unquantized base)"
            )
        click.echo(
            f"merge: {location} is stored {quantized}-quantized (4-bit): loading it, dequantizing to "
            f"{str(dtype).removeprefix('torch.')} and merging there; the merged model is 16-bit"
        )
    base = load_base(folder, dtype=dtype, **({"device_map": {"": 0}} if quantized else {}))
    if quantized:
        base = base.dequantize(dtype=dtype)  # before the adapter wraps its layers: LoRA then merges into plain ones
    model, tokenizer = with_adapter(base, folder)
    merged = model.merge_and_unload()
    check_out(out)  # again: loading took a while, and nothing put there meanwhile may be lost either
    with atomic_output(out) as scratch:
        merged.save_pretrained(str(scratch))  # safetensors
        tokenizer.save_pretrained(str(scratch))
        names = sorted(os.listdir(scratch))
        (scratch / WRITTEN_LIST).write_text(json.dumps({"files": names}, indent=2) + "\n", encoding="utf-8")
    click.echo(f"merge: {location} + {folder} -> {out} (load it with AutoModelForCausalLM.from_pretrained)")
