"""Training throughput of the train stage per backend and base precision: tokens/s, peak GPU memory, MFU.

Each variant runs `friction train` itself (params.yaml, TRL's SFTTrainer, evaluation, checkpoints, dvclive, adapter)
in a scratch workspace and a process of its own, with the card recipe's LoRA, batch, optimizer and precision, on a
model of Qwen2.5-0.5B's shape built from its config (random weights: the loss means nothing) over packed rows of
4096 random tokens. Throughput is train.json's steady_tokens_per_s: the median over optimizer steps, the first one
left out. MFU counts the FLOPs LoRA training needs (`model_flops_per_token`) against the GPU's dense bf16 peak.

Run on a CUDA machine, after `make setup cuda` (and `make unsloth` for the unsloth rows):
    python bench/train_throughput.py --out build/bench
Check the script itself on a CPU in about a minute (a tiny model, fp32, hf only):
    python bench/train_throughput.py --smoke --out build/bench-smoke
Results: BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.pack import PACKED_SCHEMA  # noqa: E402
from stages.pipeline import stage_argv  # noqa: E402

FRICTION = [sys.executable, "-c", "from stages.cli import main; main()"]  # this interpreter's, whatever PATH says
from stages.tiny_model import build_tiny_model, corpus_from_jsonl  # noqa: E402

# Qwen2.5-0.5B's published config; the tokenizer stays tiny, its ids all fall in the first rows of the embedding.
QWEN2_5_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768,
)  # fmt: skip
VARIANTS = {
    "hf-bf16": {"train": {"backend": "hf"}, "model": {"load_in_4bit": False}},
    "hf-4bit": {"train": {"backend": "hf"}, "model": {"load_in_4bit": True}},
    "unsloth-bf16": {"train": {"backend": "unsloth"}, "model": {"load_in_4bit": False}},
    "unsloth-4bit": {"train": {"backend": "unsloth"}, "model": {"load_in_4bit": True}},
}
# A CPU can run none of the CUDA paths: fp32, torch's AdamW, a short context.
SMOKE = {"train": {"precision": "fp32", "optimizer": "adamw_torch"}, "model": {"max_length": 256}}
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's datasheet figure for the H100 SXM, also the H200's


def packed_rows(rows: int, length: int, rng: np.random.Generator, vocab: int) -> pa.Table:
    """Rows of exactly `length` tokens: documents of 1/16 to 1/2 of a row each, the first quarter of every one
    unlabelled (its prompt), laid end to end; the last document of a row is cut to fit, as pack.overflow truncate."""
    columns = {"input_ids": [], "labels": [], "seq_lengths": []}
    for _ in range(rows):
        lengths = []
        while sum(lengths) < length:
            lengths.append(min(int(rng.integers(length // 16, length // 2 + 1)), length - sum(lengths)))
        input_ids = rng.integers(0, vocab, size=length)
        labels = input_ids.copy()
        start = 0
        for document in lengths:
            labels[start : start + document // 4] = -100
            start += document
        columns["input_ids"].append(input_ids.tolist())
        columns["labels"].append(labels.tolist())
        columns["seq_lengths"].append(lengths)
    return pa.Table.from_pydict(columns, schema=PACKED_SCHEMA)


def attended_tokens_per_token(packed: Path) -> float:
    """How many tokens a token attends to, on average over tokens, with causal attention within its document."""
    lengths = np.concatenate(pq.read_table(packed, columns=["seq_lengths"]).column(0).to_numpy(zero_copy_only=False))
    lengths = lengths.astype(np.float64)
    return float((lengths * (lengths + 1) / 2).sum() / lengths.sum())


def model_flops_per_token(config: dict, lora_parameters: int, attended: float) -> float:
    """FLOPs that one token of LoRA training needs (recomputation by activation checkpointing not counted).

    Frozen matrices: forward (2 per weight) and the gradient with respect to their input (2 per weight), no weight
    gradient. The LoRA matrices: forward, input and weight gradients (6 per weight). Attention scores and their
    weighted sum: 2 x 2 x hidden FLOPs per attended token in the forward pass, twice that backward.
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv_width = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * config["intermediate_size"]
    frozen = layers * per_layer + config["vocab_size"] * hidden  # the language-model head is a matrix product too
    attention = layers * 3 * (2 * 2 * hidden * attended)
    return 4 * frozen + 6 * lora_parameters + attention


def matmul_tflops() -> float | None:
    """The bf16 rate of one large matrix product on this GPU: a ceiling that the datasheet's peak may not reach."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times[3:]) / 1e12


def base_has_shape(base: Path, shape: dict) -> bool:
    config_path = base / "config.json"
    if not config_path.is_file():
        return False
    config = json.loads(config_path.read_text())
    return all(config.get(key) == value for key, value in shape.items())


def deep_update(target: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(target[key], value)
        else:
            target[key] = value


def run_variant(name: str, changes: list[dict], out: Path, base: Path, packed: Path, timeout: int) -> dict:
    workspace = out / name
    shutil.rmtree(workspace, ignore_errors=True)
    (workspace / "data/raw").mkdir(parents=True)
    (workspace / "data/packed").symlink_to(packed.resolve(), target_is_directory=True)
    (workspace / "data/raw/manifest.json").write_text(
        json.dumps({"base_model": {"location": str(base.resolve()), "resolved_revision": None}})
    )
    yaml = YAML()
    params = yaml.load(REPO / "recipes/card.yaml")
    for change in changes:
        deep_update(params, change)
    yaml.dump(params, workspace / "params.yaml")

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "UNSLOTH_DISABLE_STATISTICS": "1",  # unsloth would otherwise try to reach the Hub when imported
    }
    started = time.perf_counter()
    try:
        process = subprocess.run(
            [*FRICTION, *stage_argv("train", REPO / "dvc.yaml")[1:]],
            cwd=workspace, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        log, failed = process.stdout + process.stderr, process.returncode != 0
    except subprocess.TimeoutExpired as expired:  # its output comes as bytes, text=True or not
        output = b"".join(stream or b"" for stream in (expired.stdout, expired.stderr)).decode(errors="replace")
        log, failed = f"{output}\ntimed out after {timeout} s", True
    (workspace / "train.log").write_text(log)
    result = {"variant": name, "wall_s": round(time.perf_counter() - started, 1)}
    if failed:
        return result | {"error": log[-3000:]}
    return result | {"train": json.loads((workspace / "metrics/train.json").read_text())}


def table(results: list[dict], peak_tflops: float) -> str:
    reference = next((r["train"]["steady_tokens_per_s"] for r in results if "train" in r), None)
    lines = [
        "| variant | tokens/s | vs first | s/step | peak GiB | MFU | final loss | device |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['variant']} | failed: see {result['variant']}/train.log | | | | | | |")
            continue
        train, mfu = result["train"], result.get("mfu")
        lines.append(
            f"| {result['variant']} | {train['steady_tokens_per_s']:,.0f} | "
            f"{train['steady_tokens_per_s'] / reference:.2f} | {train['step_seconds_median']:.3f} | "
            f"{train['peak_memory_mb'] / 1024:.1f} | {f'{mfu:.1%}' if mfu is not None else 'n/a'} | "
            f"{train['final_train_loss']:.3f} | {train['device']} |"
        )
    return "\n".join(lines) + f"\n\nMFU against {peak_tflops:g} TFLOP/s dense bf16."


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), default="build/bench", show_default=True)
@click.option("--variant", "variants", multiple=True, type=click.Choice(list(VARIANTS)), help="Default: all.")
@click.option("--steps", default=30, show_default=True, help="Optimizer steps per variant.")
@click.option("--timeout", default=600, show_default=True, help="Seconds one variant may take.")
@click.option("--peak-tflops", default=H100_BF16_DENSE_TFLOPS, show_default=True, help="The GPU's dense bf16 peak.")
@click.option("--smoke", is_flag=True, help="A tiny model on a CPU: checks this script, measures nothing useful.")
def main(out: Path, variants: tuple[str, ...], steps: int, timeout: int, peak_tflops: float, smoke: bool) -> None:
    """Train each variant for --steps optimizer steps and print tokens/s, step time, peak memory and MFU."""
    variants = variants or (("hf-bf16",) if smoke else tuple(VARIANTS))
    yaml = YAML(typ="safe")
    card = yaml.load(REPO / "recipes/card.yaml")
    length = SMOKE["model"]["max_length"] if smoke else card["model"]["max_length"]
    rows_per_step = card["train"]["batch_size"] * card["train"]["grad_accum"]

    base, packed, shape = out / "base", out / "packed", {} if smoke else QWEN2_5_0_5B
    if not base_has_shape(base, shape):  # built once, then reused by later invocations with the same --out
        shutil.rmtree(base, ignore_errors=True)
        build_tiny_model(corpus_from_jsonl(sorted((REPO / "data/sources/demo").glob("*.jsonl"))), base, **shape)
    config = json.loads((base / "config.json").read_text())
    click.echo(f"base: {', '.join(f'{key} {config[key]}' for key in QWEN2_5_0_5B)}")
    rng = np.random.default_rng(0)
    packed.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", steps * rows_per_step), ("validation", rows_per_step)):
        pq.write_table(packed_rows(rows, length, rng, config["vocab_size"]), packed / f"{split}.parquet")
    attended = attended_tokens_per_token(packed / "train.parquet")

    schedule = {"train": {"max_steps": steps, "eval_steps": steps, "logging_steps": 1}}
    ceiling = matmul_tflops()
    if ceiling:
        click.echo(f"bf16 8192x8192x8192 matrix product: {ceiling:.0f} TFLOP/s")
    results = []
    for name in variants:
        click.echo(f"{name}: training {steps} steps of {rows_per_step} rows x {length} tokens")
        result = run_variant(name, [VARIANTS[name], SMOKE if smoke else {}, schedule], out, base, packed, timeout)
        if "train" in result:
            flops = model_flops_per_token(config, result["train"]["trainable_parameters"], attended)
            on_gpu = not result["train"]["device"].startswith("cpu")
            result |= {
                "base": {key: config[key] for key in QWEN2_5_0_5B},
                "flops_per_token": flops,
                "mfu": result["train"]["steady_tokens_per_s"] * flops / (peak_tflops * 1e12) if on_gpu else None,
                "matmul_tflops": ceiling,
            }
        results.append(result)
        with (out / "results.jsonl").open("a") as log:
            log.write(json.dumps(result) + "\n")
        click.echo(result.get("error", "")[-1500:])
    click.echo(table(results, peak_tflops))
    if any("error" in result for result in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
