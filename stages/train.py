"""train: LoRA on the base model with TRL's SFTTrainer over the packed rows, logged with dvclive (friction/training.py).

This module imports nothing heavy at the top: with `train.gpus` > 1 the stage first restarts itself under torchrun,
and the backend is resolved before transformers is imported, since unsloth must be imported first to patch it.
"""

from __future__ import annotations

from pathlib import Path

import click

from friction import distributed, environment
from friction.config import load_params
from friction.modeling import resolve_backend
from friction.pipeline import path_option


@click.command()
@path_option("--packed", "Output of pack.")
@path_option("--manifest", "Names the base model.")
@path_option("--adapter", "Where the PEFT adapter and tokenizer go.")
@path_option("--checkpoints", "Resumable checkpoints (persisted across runs).")
@path_option("--live", "dvclive logs and plots.")
@path_option("--metrics", "Training summary.")
def main(packed: Path, manifest: Path, adapter: Path, checkpoints: Path, live: Path, metrics: Path) -> None:
    """Train the LoRA adapter with the backend train.backend names (auto: unsloth on a CUDA GPU if installed)."""
    params = load_params()
    distributed.launch(params.train.gpus)  # train.gpus > 1: restarts this command under torchrun
    recorded = environment.record("train")  # warns before the work when the environment is not the lock's
    backend = resolve_backend(params.train.backend, params.train.gpus)  # imports unsloth before transformers
    from friction import training

    training.run(params, backend, packed, manifest, adapter, checkpoints, live, metrics)
    if distributed.is_main_process():  # the one process that wrote the metrics
        environment.write_into(metrics, recorded)
