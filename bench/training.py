"""Training on a CPU, same tiny model (the demo base), same LoRA and batch, same number of optimizer steps:

- ours: the train stage itself (`python -m stages train`: evaluation, checkpoints, dvclive, adapter) on pack's bfd rows, with
  the attention `model.attn_implementation: auto` resolves to (on a CPU, varlen: one SDPA call per document).
- bare TRL: a plain SFTTrainer with padding-free batching on the same bfd rows and the same attention, nothing else
  (our overhead).
- original: the original's collation: stacked rows (next-fit, one sequence a row, examples attend to each other), every
  row padded to model.max_length, through the same SFTTrainer with transformers' default attention (sdpa, whose mask
  hides only the padding).

Real tokens/s is the median over optimizer steps of real (not padding) tokens over the step's time, the first step
(warm-up) left out, as train.json's `steady_tokens_per_s` measures it for ours: evaluation and checkpoints fall outside
the steps (ours' whole-run rate with them, `train_tokens_per_s`, is recorded too). bare TRL and the original count the
tokens their collator hands the model. Each run is a process of its own, interleaved. At demo lengths the rows come from the demo's mix (1,024); at
card-like lengths from bench/packing.py's card-scale corpus (4,096).

    python bench/training.py variant {bare_trl,original} WORKSPACE PACKED_DIR   # one run, prints its tokens/s
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import interleaved, ratio, run_measured, stage_command  # noqa: E402
from friction.demo import update_params  # noqa: E402

STEPS = {
    "demo": 8,
    "card_like": 8,
}  # optimizer steps per run; the first one (warm-up) is not counted, the median of the
# other seven is steady against a step that jitters (with three steps, two were measured: one slow step moved the median)


def write_packed(examples: Any, params: Any, strategy: str, out: Path, bos: int | None) -> None:
    from bench.packing import with_strategy
    from friction.packing import pack_columns
    from friction.schemas import write_parquet

    out.mkdir(parents=True, exist_ok=True)
    table, _ = pack_columns(examples, with_strategy(params, strategy, params.model.max_length), bos)
    write_parquet(table, out / "train.parquet")
    write_parquet(table.slice(0, 2), out / "validation.parquet")  # the stage evaluates: keep that part small


def ours(workspace: Path, packed: Path, scratch: Path, count: list[int], whole_run: list[float]) -> float:
    count[0] += 1
    out = scratch / f"ours-{count[0]}"
    shutil.rmtree(out, ignore_errors=True)
    command = stage_command(
        "train",
        packed=packed,
        adapter=out / "adapter",
        checkpoints=out / "checkpoints",
        live=out / "dvclive",
        metrics=out / "train.json",
    )
    run_measured(command, workspace)
    metrics = json.loads((out / "train.json").read_text())
    whole_run.append(metrics["train_tokens_per_s"])
    return metrics["steady_tokens_per_s"]


def other(variant: str, workspace: Path, packed: Path) -> float:
    run = run_measured([sys.executable, __file__, "variant", variant, str(workspace), str(packed)], workspace)
    return float(run.output.strip().splitlines()[-1])


def compare(workspace: Path, bfd: Path, stacked: Path, runs: int, scratch: Path) -> dict[str, Any]:
    count, whole_run = [0], []
    rates = interleaved(
        runs,
        ours=lambda: ours(workspace, bfd, scratch, count, whole_run),
        bare_trl=lambda: other("bare_trl", workspace, bfd),
        original=lambda: other("original", workspace, stacked),
    )
    return {
        "tokens_per_s": rates,
        "ours_whole_run_tokens_per_s": whole_run,
        "ours_over_original": ratio(rates["ours"], rates["original"]),
        "ours_over_bare_trl": ratio(rates["ours"], rates["bare_trl"]),
    }


def run(scratch: Path, runs: int) -> dict[str, Any]:
    """Needs bench/pipeline.py's workspace (scratch/pipeline), for its fetched base model and mixed data."""
    from bench.packing import card_scale_examples, layouts
    from friction.config import load_params
    from friction.packing import read_split

    workspace = scratch / "pipeline"
    original_params = (workspace / "params.yaml").read_text()
    results: dict[str, Any] = {}
    try:
        for name, max_length in (("demo", 1024), ("card_like", 4096)):
            update_params(
                workspace / "params.yaml", {"model": {"max_length": max_length}, "train": {"max_steps": STEPS[name]}}
            )
            params = load_params(workspace / "params.yaml")
            examples, bos = read_split(workspace / "data/mixed/train.parquet", params)
            if name == "card_like":
                examples = card_scale_examples()
            out = scratch / f"training-{name}"
            write_packed(examples, params, "bfd", out / "bfd", bos)
            write_packed(examples, params, "stacked", out / "stacked", bos)
            slots = layouts(examples, params, bos, max_length)
            results[name] = {
                "max_length": max_length,
                "steps": STEPS[name],
                "original_over_ours_row_slots": slots["original_over_ours_row_slots"],
                **compare(workspace, out / "bfd", out / "stacked", runs, out),
            }
            (scratch / "training-partial.json").write_text(json.dumps(results, indent=1))  # each length as it ends
    finally:
        (workspace / "params.yaml").write_text(original_params)
    return results


def train_variant(variant: str, workspace: Path, packed: Path) -> float:
    """One run of bare TRL or the original collation; returns its steady real tokens/s."""
    import statistics
    import time

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from friction.chatml import IGNORE_INDEX
    from friction.config import load_params
    from friction.modeling import hf_model_with_adapter

    params = load_params(workspace / "params.yaml")
    if variant == "original":  # varlen refuses padded rows; the original trained them with transformers' default
        params = params.model_copy(update={"model": params.model.model_copy(update={"attn_implementation": "sdpa"})})
    train = params.train
    model, tokenizer = hf_model_with_adapter(params, workspace / "data/raw/manifest.json")
    rows = Dataset.from_parquet(str(packed / "train.parquet"))
    padding_free = variant == "bare_trl"
    real_tokens = [0]
    max_length = params.model.max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def padded(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The original's collation: each stacked row padded to max_length, attention within the row only."""
        ids = torch.full((len(batch), max_length), pad)
        labels = torch.full((len(batch), max_length), IGNORE_INDEX)
        mask = torch.zeros((len(batch), max_length), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
            real_tokens[0] += n
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    config = SFTConfig(
        output_dir=str(packed / f"{variant}-out"),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        optim=train.optimizer,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=train.gradient_checkpointing,
        seed=params.seed,
        data_seed=params.seed,
        dataset_kwargs={"skip_prepare_dataset": True},
        padding_free=padding_free,
        max_length=None,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10**6,
        remove_unused_columns=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=rows if padding_free else rows.remove_columns("seq_lengths"),
        processing_class=tokenizer,
        data_collator=None if padding_free else padded,
    )
    if padding_free:
        collate = trainer.data_collator

        def counted(batch: list[dict[str, Any]]) -> dict[str, Any]:
            real_tokens[0] += sum(len(row["input_ids"]) for row in batch)
            return collate(batch)

        trainer.data_collator = counted
    steps: list[tuple[int, float]] = []

    class Steps(TrainerCallback):
        """A step's batches are fetched (and counted) before on_step_begin: its tokens are those counted since the
        previous step ended."""

        counted_until = 0
        started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append((real_tokens[0] - self.counted_until, time.perf_counter() - self.started))
            self.counted_until = real_tokens[0]

    trainer.add_callback(Steps())
    trainer.train()
    return statistics.median(tokens / seconds for tokens, seconds in steps[1:] or steps)


@click.group()
def main() -> None:
    pass


@main.command()
@click.argument("variant", type=click.Choice(["bare_trl", "original"]))
@click.argument("workspace", type=click.Path(path_type=Path))
@click.argument("packed", type=click.Path(path_type=Path))
def variant(variant: str, workspace: Path, packed: Path) -> None:
    click.echo(train_variant(variant, workspace, packed))


if __name__ == "__main__":
    main()
