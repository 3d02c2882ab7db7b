"""train: LoRA on the base model with TRL's SFTTrainer over the packed rows, logged with dvclive.

Evaluates every `train.eval_steps`, keeps the best checkpoint by validation loss and stops early as the card's run
did. Checkpoints live in a persisted directory: a run killed midway resumes from its last checkpoint when the
stage runs again with the same inputs; any change of inputs starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time
from pathlib import Path

import click
import torch
from datasets import Dataset
from dvclive import Live
from peft import LoraConfig, get_peft_model
from transformers import EarlyStoppingCallback, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from stages.artifacts import sha256_file, write_json
from stages.chatml import CHAT_TEMPLATE
from stages.config import Params
from stages.modeling import device_name, library_versions, load_base_model

def run_fingerprint(params: Params, packed_dir: Path, manifest_path: Path) -> str:
    """Everything a checkpoint depends on; a checkpoint from another fingerprint is never resumed."""
    inputs = {
        "params": params.model_dump(include={"seed", "model", "lora", "train"}),
        "data": {p.name: sha256_file(p) for p in sorted(packed_dir.glob("*.parquet"))},
        "base": sha256_file(manifest_path),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """The latest complete checkpoint of a run with the same fingerprint; otherwise start the directory afresh."""
    stamp = checkpoint_dir / "fingerprint.txt"
    if checkpoint_dir.is_dir() and stamp.is_file() and stamp.read_text() == fingerprint:
        # The trainer writes trainer_state.json last: a checkpoint killed while being saved lacks it.
        complete = [path.parent for path in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{TRAINER_STATE_NAME}")]
        if complete:
            return max(complete, key=lambda path: int(path.name.rpartition("-")[2]))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return None


class LiveLog(TrainerCallback):
    """Logs loss, eval loss and learning rate to dvclive against the optimizer step.

    On resume the trainer's restored history is replayed first, so the plots show one unbroken run.
    """

    LOGGED = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
              "eval_loss": "eval/loss"}  # fmt: skip

    def __init__(self, live_dir: Path) -> None:
        self.live_dir = live_dir
        self.live: Live | None = None
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        shutil.rmtree(self.live_dir, ignore_errors=True)
        self.live = Live(str(self.live_dir), dvcyaml=None, save_dvc_exp=False)
        for entry in state.log_history:
            self._log(entry)
        self.tokens_at_start = state.num_input_tokens_seen

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


def sft_config(params: Params, checkpoint_dir: Path) -> SFTConfig:
    train = params.train
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the planned steps
        optim=train.optimizer,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        bf16=train.precision == "bf16",
        fp16=train.precision == "fp16",
        use_cpu=not cuda,
        activation_checkpointing=train.gradient_checkpointing,
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


def best_eval(log_history: list[dict]) -> tuple[float | None, float | None]:
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if not evals:
        return None, None
    best = min(evals, key=lambda entry: entry["eval_loss"])
    return best["eval_loss"], best["epoch"]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(
    params: Params, packed_dir: Path, manifest_path: Path, adapter_dir: Path, checkpoint_dir: Path,
    live_dir: Path, metrics_path: Path,
) -> None:  # fmt: skip
    started = time.perf_counter()
    fingerprint = run_fingerprint(params, packed_dir, manifest_path)
    resume_from = resumable_checkpoint(checkpoint_dir, fingerprint)
    if resume_from:
        click.echo(f"train: resuming from {resume_from}")

    set_seed(params.seed)  # before the adapter exists, so LoRA's initial weights follow the seed too
    model, tokenizer, location, revision = load_base_model(params, manifest_path)
    lora = LoraConfig(
        r=params.lora.rank,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        task_type="CAUSAL_LM",
        revision=revision,
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    click.echo(f"train: {trainable:,} trainable of {total:,} parameters on {device_name()}")

    live_log = LiveLog(live_dir)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(params, checkpoint_dir),
        train_dataset=Dataset.from_parquet(str(packed_dir / "train.parquet")),
        eval_dataset=Dataset.from_parquet(str(packed_dir / "validation.parquet")),
        processing_class=tokenizer,
        callbacks=[
            EarlyStoppingCallback(params.train.early_stopping_patience, params.train.early_stopping_threshold),
            live_log,
        ],
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    adapter_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft writes a stub card; the card stage owns README.md
    tokenizer.chat_template = CHAT_TEMPLATE  # so apply_chat_template reproduces the training format
    tokenizer.save_pretrained(str(adapter_dir))

    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    best_loss, best_epoch = best_eval(trainer.state.log_history)
    write_json(
        metrics_path,
        {
            "final_train_loss": train_losses[-1] if train_losses else result.training_loss,
            "best_eval_loss": best_loss,
            "best_eval_epoch": best_epoch,
            "epochs_run": trainer.state.epoch,
            "steps": trainer.state.global_step,
            "stopped_early": trainer.state.global_step < trainer.state.max_steps,
            "runtime_s": round(time.perf_counter() - started, 1),
            "train_tokens_per_s": round(
                (trainer.state.num_input_tokens_seen - live_log.tokens_at_start) / result.metrics["train_runtime"], 1
            ),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "trainable_parameters": trainable,
            "backend": "hf",
            "device": device_name(),
            "base_model": location,
            "base_revision": revision,
            "versions": library_versions(),
        },
    )
    click.echo(f"train: best eval loss {best_loss} at epoch {best_epoch}; adapter in {adapter_dir}")
