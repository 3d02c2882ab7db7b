"""The train stage's work (stages/train.py): LoRA on the base model with TRL's SFTTrainer over the packed rows, logged with dvclive.

The base model and its fresh adapter come from the backend `train.backend` resolves to (friction/modeling.py: hf or
unsloth); everything after that is the same for both. Evaluates every `train.eval_steps`, keeps the best checkpoint
by validation loss and stops early as the card's run did. Checkpoints live in a persisted directory: a run killed
midway resumes from its last complete checkpoint when the stage runs again with the same inputs and backend; any
change of them starts afresh, but only once training is about to begin: everything that can be checked (params
against the installed transformers and the base's modules, the packed files) is checked first, so a mistake never
costs the checkpoints of a run. A loss that turns NaN or infinite stops the run with an error and no adapter; the
adapter appears only when training has ended well.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import statistics
import time
from dataclasses import fields
from pathlib import Path

import click
import torch
from datasets import Dataset
from dvclive import Live
from transformers import EarlyStoppingCallback, GenerationConfig, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from friction import attention, distributed
from friction.artifacts import atomic_output, base_model_reference, sha256_file, write_json
from friction.chatml import CHAT_TEMPLATE
from friction.config import Params
from friction.modeling import MODEL_WITH_ADAPTER, device_name, library_versions
from friction.tokens import end_of_turn_id
from friction.train_checks import check_before_training


def packed_datasets(packed_dir: Path, backend: str, max_length: int) -> tuple[Dataset, Dataset]:
    """The packed train and validation rows, as `backend` must be handed them."""
    splits = tuple(Dataset.from_parquet(str(packed_dir / f"{split}.parquet")) for split in ("train", "validation"))
    if backend == "unsloth":
        for rows in splits:
            # pack wrote no row longer than model.max_length. unsloth reads that claim from this attribute (its
            # "truncation attestation"); without it, unsloth turns padding-free batching off, and then the examples
            # packed in a row attend to each other (seen with unsloth 2026.10.9 on an H100, BENCHMARKS.md).
            rows._unsloth_truncated_to = max_length
    return splits


def run_fingerprint(params: Params, backend: str, packed_dir: Path, manifest_path: Path) -> str:
    """Everything a checkpoint depends on; a checkpoint from another fingerprint is never resumed."""
    inputs = {
        "params": params.model_dump(include={"seed", "model", "lora", "train"}),
        "backend": backend,  # train.backend auto may resolve differently on another machine
        "data": {p.name: sha256_file(p) for p in sorted(packed_dir.glob("*.parquet"))},
        "base": sha256_file(manifest_path),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """The latest complete checkpoint of a run with the same fingerprint, if any. Deletes nothing."""
    stamp = checkpoint_dir / "fingerprint.txt"
    if not (checkpoint_dir.is_dir() and stamp.is_file() and stamp.read_text() == fingerprint):
        return None
    complete = [
        path.parent
        for path in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{TRAINER_STATE_NAME}")
        if is_complete_state(path)
    ]
    return max(complete, key=lambda path: int(path.name.rpartition("-")[2]), default=None)


def is_complete_state(state_file: Path) -> bool:
    """The trainer writes trainer_state.json last: a checkpoint killed while being saved lacks it, or holds a
    truncated one."""
    try:
        return isinstance(json.loads(state_file.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def start_afresh(checkpoint_dir: Path, fingerprint: str) -> None:
    """Clear the checkpoints of other inputs: called only when this run is about to train."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / "fingerprint.txt").write_text(fingerprint)


class LiveLog(TrainerCallback):
    """Logs loss, eval loss and learning rate to dvclive against the optimizer step.

    On resume the trainer's restored history is replayed first, so the plots show one unbroken run.
    """

    LOGGED = {
        "loss": "train/loss",
        "learning_rate": "train/learning_rate",
        "grad_norm": "train/grad_norm",
        "eval_loss": "eval/loss",
    }

    def __init__(self, live_dir: Path) -> None:
        self.live_dir = live_dir
        self.live: Live | None = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        shutil.rmtree(self.live_dir, ignore_errors=True)
        self.live = Live(str(self.live_dir), dvcyaml=None, save_dvc_exp=False)
        for entry in state.log_history:
            self._log(entry)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        self._log({**logs, "step": state.global_step})

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.live.end()

    def _log(self, entry: dict) -> None:
        logged = {name: entry[key] for key, name in self.LOGGED.items() if key in entry}
        if logged:
            self.live.step = entry["step"]
            for name, value in logged.items():
                self.live.log_metric(name, value)
            self.live.make_summary()


class StopOnNonFiniteLoss(TrainerCallback):
    """A loss that is NaN or infinite will not come back: stop with an error rather than save a broken adapter."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        for key in ("loss", "eval_loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise click.ClickException(
                    f"train: {key} is {value} at step {state.global_step}; no adapter is saved. Lower "
                    "train.learning_rate or lora.alpha, or check the data (metrics/pack.json)"
                )


class StepTimer(TrainerCallback):
    """Wall time and input tokens of every optimizer step; evaluation, checkpointing and logging fall outside."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []  # (tokens, seconds)
        self.tokens_at_start = 0  # of this session: a resumed run has seen tokens before it
        self._started = 0.0
        self._tokens_before = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.tokens_at_start = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._synchronize()
        self._started = time.perf_counter()
        self._tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._synchronize()
        self.steps.append((state.num_input_tokens_seen - self._tokens_before, time.perf_counter() - self._started))

    @staticmethod
    def _synchronize() -> None:
        if torch.cuda.is_available():  # CUDA runs ahead of Python: wait for the step's kernels before reading the clock
            torch.cuda.synchronize()

    def steady_rate(self) -> tuple[float | None, float | None]:
        """(median seconds per step, median tokens/s per step) with this session's first step, the warm-up, left out."""
        steady = self.steps[1:] or self.steps
        if not steady:
            return None, None
        return statistics.median(s for _, s in steady), statistics.median(t / s for t, s in steady)


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """Activation checkpointing on or off, under the name this transformers knows.

    transformers 5.24 calls it activation_checkpointing; the 5.17 that unsloth's pins hold, gradient_checkpointing.
    """
    names = {field.name for field in fields(SFTConfig)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def sft_config(params: Params, backend: str, checkpoint_dir: Path) -> SFTConfig:
    train = params.train
    cuda = torch.cuda.is_available()
    processes = distributed.world_size()
    batch_size, grad_accum = distributed.per_device_schedule(train.batch_size, train.grad_accum, processes)
    # unsloth's get_peft_model has set up its own checkpointing; the trainer's would replace it.
    trainer_checkpointing = train.gradient_checkpointing and backend == "hf"
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: no search for unused ones per step
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the planned steps
        optim=train.optimizer,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        bf16=train.precision == "bf16",
        fp16=train.precision == "fp16",
        use_cpu=not cuda,
        **checkpointing_argument(trainer_checkpointing),
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.eval_steps,
        save_total_limit=2,  # the best and the latest survive
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=train.logging_steps,
        include_num_input_tokens_seen=True,
        seed=params.seed,
        data_seed=params.seed,
        # Rows are packed by the pack stage: no tokenization, truncation or packing here.
        dataset_kwargs={"skip_prepare_dataset": True},
        padding_free=True,
        max_length=None,  # rows are already at most model.max_length
        report_to="none",
        disable_tqdm=False,
    )


def require_padding_free(args: SFTConfig, backend: str) -> None:
    """Stop before training if the trainer has turned padding-free batching off (unsloth can, see packed_datasets):
    the examples packed in a row are kept apart only by the position ids it builds from `seq_lengths`."""
    if not args.padding_free:
        raise click.ClickException(
            f"train: the {backend} backend turned padding-free batching off, so the examples packed in a row would "
            "attend to each other; install the unsloth of requirements/unsloth.txt (make unsloth) or set "
            "train.backend: hf in params.yaml"
        )


def best_eval(log_history: list[dict]) -> tuple[float | None, float | None]:
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if not evals:
        return None, None
    best = min(evals, key=lambda entry: entry["eval_loss"])
    return best["eval_loss"], best["epoch"]


def peak_memory() -> tuple[float, str]:
    """The peak memory of training in MiB, and what it measures."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU memory allocated by torch"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "resident memory of the process"  # Linux: KiB


def build_trainer(
    params: Params,
    backend: str,
    model,
    tokenizer,
    packed_dir: Path,
    checkpoint_dir: Path,
    callbacks: list[TrainerCallback],
) -> SFTTrainer:
    train_rows, validation_rows = packed_datasets(packed_dir, backend, params.model.max_length)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(params, backend, checkpoint_dir),
        train_dataset=train_rows,
        eval_dataset=validation_rows,
        processing_class=tokenizer,
        callbacks=[
            EarlyStoppingCallback(params.train.early_stopping_patience, params.train.early_stopping_threshold),
            StopOnNonFiniteLoss(),
            *callbacks,
        ],
    )
    require_padding_free(trainer.args, backend)
    # What the trainer's own collator makes of the first rows: their documents must reach attention apart.
    first_rows = [train_rows[index] for index in range(min(2, len(train_rows)))]
    attention.check_collated_documents(trainer.data_collator, first_rows, backend)
    return trainer


def save_adapter(model, tokenizer, adapter_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter, its tokenizer (<|im_end|> its EOS, as in the data) and the generation settings that stop on it.

    `state_dict`: the whole adapter gathered from FSDP's shards; None when `model` holds it whole.
    """
    model.save_pretrained(str(adapter_dir), state_dict=state_dict)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft writes a stub card; the card stage owns README.md
    # peft keeps target_modules as a set and writes it in hash order: sort it, so the file (and dvc.lock) never
    # depends on PYTHONHASHSEED.
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    tokenizer.chat_template = CHAT_TEMPLATE  # so apply_chat_template reproduces the training format
    tokenizer.save_pretrained(str(adapter_dir))
    generation = GenerationConfig.from_dict(model.generation_config.to_dict())
    if end_of_turn_id(tokenizer) is not None:  # any engine that reads generation_config.json stops at <|im_end|>
        generation.eos_token_id = end_of_turn_id(tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(adapter_dir))


def run(
    params: Params,
    backend: str,
    packed_dir: Path,
    manifest_path: Path,
    adapter_dir: Path,
    checkpoint_dir: Path,
    live_dir: Path,
    metrics_path: Path,
) -> None:
    """Train with `backend` ("hf" or "unsloth", as `friction.modeling.resolve_backend` chose it)."""
    started = time.perf_counter()
    check_before_training(params, packed_dir, manifest_path)  # before anything is touched
    fingerprint = run_fingerprint(params, backend, packed_dir, manifest_path)
    resume_from = distributed.on_main_process(lambda: resumable_checkpoint(checkpoint_dir, fingerprint))

    set_seed(params.seed)  # before the adapter exists, so LoRA's initial weights follow the seed too
    model, tokenizer = MODEL_WITH_ADAPTER[backend](params, manifest_path)
    trainable, total = model.get_nb_trainable_parameters()
    click.echo(f"train: {trainable:,} trainable of {total:,} parameters, {backend} backend on {device_name()}")
    step_timer = StepTimer()
    callbacks = [LiveLog(live_dir), step_timer] if distributed.is_main_process() else [step_timer]  # dvclive: once
    trainer = build_trainer(params, backend, model, tokenizer, packed_dir, checkpoint_dir, callbacks)
    if resume_from:
        click.echo(f"train: resuming from {resume_from}")
    else:
        distributed.on_main_process(lambda: start_afresh(checkpoint_dir, fingerprint))
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not math.isfinite(result.training_loss):  # logged losses are checked as they come; this is the mean of all
        raise click.ClickException(f"train: the mean training loss is {result.training_loss}; no adapter is saved")
    state_dict = distributed.full_state_dict(trainer)  # FSDP: gathered from every process's shard
    if not trainer.is_world_process_zero():
        return  # data parallel: the adapter and metrics of the run are written once, by the first process

    with atomic_output(adapter_dir) as scratch:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, scratch, state_dict)
    summary = train_summary(trainer, result, step_timer, backend, manifest_path, time.perf_counter() - started)
    write_json(metrics_path, summary)
    click.echo(
        f"train: best eval loss {summary['best_eval_loss']} at epoch {summary['best_eval_epoch']}; "
        f"adapter in {adapter_dir}"
    )


def train_summary(
    trainer: SFTTrainer, result, step_timer: StepTimer, backend: str, manifest_path: Path, runtime_s: float
) -> dict:
    """metrics/train.json: losses, schedule, speed, memory, and what trained on what."""
    location, revision = base_model_reference(manifest_path)
    memory_mb, memory_measure = peak_memory()
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    best_loss, best_epoch = best_eval(trainer.state.log_history)
    step_seconds, steady_tokens_per_s = step_timer.steady_rate()
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    return {
        "final_train_loss": train_losses[-1] if train_losses else result.training_loss,
        "best_eval_loss": best_loss,
        "best_eval_epoch": best_epoch,
        "epochs_run": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "stopped_early": trainer.state.global_step < trainer.state.max_steps,
        "runtime_s": round(runtime_s, 1),
        "train_tokens_per_s": round(
            (trainer.state.num_input_tokens_seen - step_timer.tokens_at_start) / result.metrics["train_runtime"], 1
        ),
        # Training steps alone (no evaluation, checkpointing or warm-up): what bench/ compares across backends.
        "step_seconds_median": None if step_seconds is None else round(step_seconds, 4),
        "steady_tokens_per_s": None if steady_tokens_per_s is None else round(steady_tokens_per_s, 1),
        "peak_memory_mb": round(memory_mb, 1),
        "peak_memory_measure": memory_measure,
        "trainable_parameters": trainable,
        "backend": backend,
        "attn_implementation": trainer.model.get_base_model().config._attn_implementation,
        **distributed.describe(),
        "per_device_batch_size": trainer.args.per_device_train_batch_size,
        "per_device_grad_accum": trainer.args.gradient_accumulation_steps,
        "device": device_name(),
        "base_model": location,
        "base_revision": revision,
        "versions": library_versions(backend),
    }
