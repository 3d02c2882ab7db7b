"""Loading the base model as fetch pinned it, with a LoRA adapter from either training backend; where it runs.

Backends (`train.backend`): `hf` is transformers + peft; `unsloth` is unsloth's FastLanguageModel, which patches
transformers, trl and peft when it is imported and must be imported before them to patch everything. So this module
imports none of them at the top: `resolve_backend` runs first and imports unsloth when unsloth is the one.
Both backends build the adapter from the same `lora_hyperparameters`; the rest of training is shared.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click
import torch

from friction import attention, distributed
from friction.artifacts import base_model_reference
from friction.config import Params

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
UNSLOTH_LIBRARIES = ("unsloth", "unsloth_zoo")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNSLOTH_REMEDY = "install it on this CUDA machine with `make unsloth`, or set train.backend: hf in params.yaml"


def library_versions(backend: str = "hf") -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES + (UNSLOTH_LIBRARIES if backend == "unsloth" else ()):
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # an optional library, e.g. bitsandbytes on CPU
            continue
    return found


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()})"


def resolve_backend(requested: str, processes: int = 1) -> str:
    """The backend that trains for `train.backend` = `requested` (auto, unsloth or hf) in `processes` data-parallel
    processes (train.gpus): "unsloth" or "hf".

    unsloth trains in one process only (it refuses data-parallel and FSDP runs), so auto is hf for several, and says
    why. Imports unsloth when the answer is unsloth, so call it before anything imports transformers, trl or peft.
    """
    if requested == "hf":
        return "hf"
    parallel = single_process_problem(processes)
    if parallel is not None:
        if requested == "unsloth":
            raise click.ClickException(
                f"train.backend: unsloth trains in one process, but {parallel}; set "
                "train.backend: hf (or auto), or train.gpus: 1 for unsloth"
            )
        click.echo(f"train: train.backend auto uses hf: unsloth trains in one process, and {parallel}")
        return "hf"
    if not torch.cuda.is_available():
        if requested == "unsloth":
            raise click.ClickException(
                "train.backend: unsloth needs a CUDA GPU and none is visible; "
                "set train.backend: hf (or auto) in params.yaml to train with transformers + peft"
            )
        return "hf"
    problem = unsloth_problem()
    if problem is None:
        return "unsloth"
    if requested == "unsloth":
        raise click.ClickException(f"train.backend: unsloth, but {problem}; {UNSLOTH_REMEDY}")
    click.echo(f"train: train.backend auto uses hf: {problem}")
    return "hf"


def single_process_problem(processes: int) -> str | None:
    """Why this run is not one process on one device; None when it is."""
    if processes > 1:
        return f"train.gpus is {processes} (data parallel)"
    if distributed.fsdp_requested():
        return "the launcher asks for FSDP"
    return None


def unsloth_problem() -> str | None:
    """Why unsloth cannot train here; None once it is imported and ready."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed"
    try:
        import unsloth  # noqa: F401  (patches transformers, trl and peft)
    except Exception as error:  # noqa: BLE001  (any failure while importing makes it unusable: CUDA kernels, pins)
        return f"unsloth fails to import ({type(error).__name__}: {error})"
    return None


def lora_hyperparameters(params: Params, revision: str | None) -> dict[str, Any]:
    """The adapter both backends build, in the keywords that peft's LoraConfig and unsloth's get_peft_model share."""
    return {
        "r": params.lora.rank,
        "lora_alpha": params.lora.alpha,
        "lora_dropout": params.lora.dropout,
        "target_modules": list(params.lora.target_modules),
        "bias": "none",
        "revision": revision,  # adapter_config.json records the base model's commit
    }


def hf_lora_config(params: Params, revision: str | None):
    from peft import LoraConfig

    return LoraConfig(**lora_hyperparameters(params, revision), task_type="CAUSAL_LM")


def unsloth_peft_arguments(params: Params, revision: str | None) -> dict[str, Any]:
    """get_peft_model's arguments: the shared LoRA settings, plus unsloth's own seed and checkpointing switches."""
    return {
        **lora_hyperparameters(params, revision),
        "random_state": params.seed,  # unsloth seeds the adapter's initial weights itself (its default is 3407)
        # unsloth's checkpointing offloads activations to CPU memory: the same maths, less GPU memory.
        "use_gradient_checkpointing": "unsloth" if params.train.gradient_checkpointing else False,
    }


def load_base_model(params: Params, manifest_path: Path, attn_implementation: str | None = None):
    """The base model and its tokenizer with transformers: (model, tokenizer, location, revision).

    `attn_implementation` None is transformers' default (sdpa), what generation in evaluate uses.
    """
    from transformers import AutoModelForCausalLM

    from friction.tokens import load_tokenizer

    location, revision = base_model_reference(manifest_path)
    if params.model.load_in_4bit and not torch.cuda.is_available():
        raise click.ClickException("model.load_in_4bit needs a CUDA GPU and bitsandbytes; set it false to train on CPU")
    kwargs: dict[str, Any] = {"revision": revision, "attn_implementation": attn_implementation}
    if params.model.load_in_4bit:
        kwargs.update(quantized_placement())
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[params.train.precision], **kwargs)
    except (OSError, ValueError) as error:  # no config.json or weights, or an unknown architecture: not a model
        raise click.ClickException(f"{location}: cannot load the base model ({error}); rerun fetch") from None
    tokenizer = load_tokenizer(location, revision)  # <|im_end|> is its EOS, as in the data mix tokenized
    return model, tokenizer, location, revision


def quantized_placement() -> dict[str, Any]:
    """from_pretrained's arguments for the NF4 base: where it lives, and how its weights are stored."""
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16
    if distributed.fsdp_requested():
        # FSDP shards the 4-bit weights like any other parameter: they must be stored in the dtype of the rest of
        # the model, and the model must not be placed on a device when loaded (FSDP places the shards).
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute
        )
        return {"quantization_config": config}
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    # A 4-bit model is placed on its GPU when loaded and cannot be moved after: each data-parallel process on its own.
    return {"quantization_config": config, "device_map": {"": distributed.local_rank()}}


def fsdp_storage_problem(stored_quantization: Any) -> str | None:
    """Why FSDP cannot shard a base whose checkpoint is stored quantized (`quantization_config` of its config.json,
    None for a bf16 checkpoint); None when it can.

    from_pretrained keeps a stored checkpoint's own quantization config and ignores the one `quantized_placement`
    passes (transformers warns, then uses the model's): the card's base, stored in 4 bit by unsloth, keeps its packed
    weights in uint8, which FSDP cannot flatten beside the bf16 ones of the rest of the model.
    """
    if stored_quantization is None:
        return None
    stored = stored_quantization if isinstance(stored_quantization, dict) else stored_quantization.to_dict()
    method, storage = stored.get("quant_method"), stored.get("bnb_4bit_quant_storage", "uint8")
    if method == "bitsandbytes" and stored.get("load_in_4bit") and storage == "bfloat16":
        return None  # stored as FSDP needs it
    what = f"4-bit weights packed in {storage}" if stored.get("load_in_4bit") else f"{method} quantization"
    return (
        f"is stored quantized ({what}), and loading keeps a stored checkpoint's own quantization, so FSDP cannot "
        "shard it beside the bf16 weights. Under FSDP use a base stored in bf16 (for the card, "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B) with model.load_in_4bit: true, which quantizes it with bf16 "
        "storage; or train data-parallel with DDP (train.gpus > 1, no FSDP config), which loads it as it is"
    )


def attention_for(params: Params, backend: str) -> str | None:
    """The attn_implementation the training model loads with (friction/attention.py); None leaves it to unsloth."""
    if backend == "unsloth":
        if params.model.attn_implementation != "auto":
            raise click.ClickException(
                f"model.attn_implementation: {params.model.attn_implementation} applies to the hf backend; unsloth "
                "picks its own attention kernels: set it to auto, or train.backend: hf"
            )
        return None
    implementation = attention.resolve(params.model.attn_implementation, DTYPES[params.train.precision])
    if implementation == attention.VARLEN:
        attention.register_varlen()
    return implementation


def hf_model_with_adapter(params: Params, manifest_path: Path):
    from peft import get_peft_model

    model, tokenizer, _, revision = load_base_model(params, manifest_path, attention_for(params, "hf"))
    return get_peft_model(model, hf_lora_config(params, revision)), tokenizer


def unsloth_model_with_adapter(params: Params, manifest_path: Path):
    from unsloth import FastLanguageModel

    from friction.tokens import map_end_of_turn

    attention_for(params, "unsloth")
    problem = single_process_problem(distributed.world_size())
    if problem is not None:  # resolve_backend never picks unsloth here; a direct call must not train wrongly either
        raise click.ClickException(f"the unsloth backend trains in one process, but {problem}; set train.backend: hf")
    location, revision = base_model_reference(manifest_path)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=location,
        revision=revision,
        use_exact_model_name=True,  # fetch pinned this model: no swap to unsloth's variant of it
        max_seq_length=params.model.max_length,
        load_in_4bit=params.model.load_in_4bit,
        dtype=DTYPES[params.train.precision],
        fix_tokenizer=False,  # the rows were tokenized with the base's own tokenizer; keep it as it is
    )
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_arguments(params, revision))
    return model, map_end_of_turn(tokenizer)  # as mix tokenized the data


# One loader per backend: (model with a fresh LoRA adapter, tokenizer).
MODEL_WITH_ADAPTER: dict[str, Callable[[Params, Path], tuple[Any, Any]]] = {
    "hf": hf_model_with_adapter,
    "unsloth": unsloth_model_with_adapter,
}
