"""What train can check before it touches any output: a mistake found here costs no checkpoint and no GPU time.

Names the installed transformers must know (optimizer, scheduler), LoRA target modules the base model must have (read
from its config on the meta device: no weights loaded), and the packed files' readability.
"""

from __future__ import annotations

from pathlib import Path

import click
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.trainer_utils import SchedulerType
from transformers.training_args import OptimizerNames

from friction import distributed, modeling
from friction.artifacts import base_model_reference
from friction.config import Params
from friction.schemas import PACKED_SCHEMA, read_parquet

PEFT_ALL_LINEAR = "all-linear"  # peft's own keyword for every linear layer but the output head


def check_before_training(params: Params, packed_dir: Path, manifest_path: Path) -> None:
    check_trainer_names(params)
    for split in ("train", "validation"):
        check_packed(packed_dir / f"{split}.parquet")
    location, revision = base_model_reference(manifest_path)
    config = base_config(location, revision)
    check_target_modules(params.lora.target_modules, base_module_names(config, location), location)
    if distributed.fsdp_requested():
        problem = modeling.fsdp_storage_problem(getattr(config, "quantization_config", None))
        if problem is not None:
            raise click.ClickException(f"model.base: {location} {problem}")


def check_trainer_names(params: Params) -> None:
    for key, value, known in (
        ("train.optimizer", params.train.optimizer, [name.value for name in OptimizerNames]),
        ("train.lr_scheduler", params.train.lr_scheduler, [name.value for name in SchedulerType]),
    ):
        if value not in known:
            raise click.ClickException(
                f"params.yaml: {key}: {value!r} is not one the installed transformers knows; one of: {', '.join(known)}"
            )


def check_packed(path: Path) -> None:
    names = read_parquet(path, rerun="pack").schema.names
    missing = [name for name in PACKED_SCHEMA.names if name not in names]
    if missing:
        raise click.ClickException(f"{path}: no column {missing[0]!r}; rerun pack")


def base_config(location: str, revision: str | None):
    try:
        return AutoConfig.from_pretrained(location, revision=revision)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"{location}: cannot read the base model's config ({error}); rerun fetch") from None


def base_module_names(config, location: str) -> set[str]:
    """Every module name of the base model's architecture, built on the meta device from its config alone."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:  # no causal-LM architecture for this config
        raise click.ClickException(f"{location}: not a causal language model ({error})") from None
    return {name for name, _ in model.named_modules() if name}


def check_target_modules(targets: list[str], module_names: set[str], location: str) -> None:
    """Each entry must name modules of the base the way peft matches them: a module's full name or its last parts."""
    if targets == [PEFT_ALL_LINEAR]:
        return
    leaves = sorted({name.rpartition(".")[2] for name in module_names} - {str(i) for i in range(len(module_names))})
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in module_names):
            raise click.ClickException(
                f"params.yaml: lora.target_modules: {target!r} names no module of {location}; its modules are "
                f"named: {', '.join(leaves)}"
            )
