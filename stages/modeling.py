"""Loading the base model as fetch pinned it, and describing where it runs."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.artifacts import base_model_reference
from stages.config import Params

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # an optional library, e.g. bitsandbytes on CPU
            continue
    return found


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()})"


def load_base_model(params: Params, manifest_path: Path):
    location, revision = base_model_reference(manifest_path)
    cuda = torch.cuda.is_available()
    if params.model.load_in_4bit and not cuda:
        raise click.ClickException("model.load_in_4bit needs a CUDA GPU and bitsandbytes; set it false to train on CPU")
    kwargs = {"revision": revision}
    if params.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[params.train.precision]
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    return model, tokenizer, location, revision
