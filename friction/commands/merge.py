"""`friction merge`: fold the adapter into its base (peft's merge_and_unload) as a model transformers loads alone.

A base stored in 4 bits (a bitsandbytes checkpoint such as unsloth's -bnb-4bit) cannot take the merged weights
exactly; it is loaded, dequantized to 16 bits, and merged there, so the result is a 16-bit model.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from friction.adapter import base_reference, load_base, require_base, with_adapter
from friction.artifacts import atomic_output

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    location, revision = base_reference(folder)
    require_base(location)
    quantized = stored_quantization(location, revision)
    dtype = DTYPES[dtype_name] if dtype_name else (torch.bfloat16 if quantized else "auto")
    if quantized:
        if not torch.cuda.is_available():
            raise click.ClickException(f"base model {location} is stored {quantized}-quantized; loading it to "
                                       "dequantize needs a CUDA GPU (or merge onto the unquantized base)")  # fmt: skip
        click.echo(f"merge: {location} is stored {quantized}-quantized (4-bit): loading it, dequantizing to "
                   f"{str(dtype).removeprefix('torch.')} and merging there; the merged model is 16-bit")  # fmt: skip
    base = load_base(folder, dtype=dtype, **({"device_map": {"": 0}} if quantized else {}))
    if quantized:
        base = base.dequantize(dtype=dtype)  # before the adapter wraps its layers: LoRA then merges into plain ones
    model, tokenizer = with_adapter(base, folder)
    merged = model.merge_and_unload()
    with atomic_output(out) as scratch:
        merged.save_pretrained(str(scratch))  # safetensors
        tokenizer.save_pretrained(str(scratch))
    click.echo(f"merge: {location} + {folder} -> {out} (load it with AutoModelForCausalLM.from_pretrained)")
