"""Training throughput of the train stage: attention kernels, backends and base precision side by side.

Each variant runs `python -m stages train` itself (params.yaml, TRL's SFTTrainer, evaluation, checkpoints, dvclive, adapter)
in a scratch workspace and a process of its own (torchrun's processes for the DDP variant), with the card recipe's
LoRA, batch, optimizer and precision, over packed rows of 4096 random tokens, on bases built from a published
config with random weights (the loss means nothing):
- `0.5b`: Qwen2.5-0.5B's shape (494,032,768 parameters), bf16;
- `7b`: DeepSeek-R1-Distill-Qwen-7B's (Qwen2.5-7B's) shape (7,615,616,512 parameters), loaded in 4 bit (QLoRA).
Throughput is train.json's steady_tokens_per_s: the median over optimizer steps, the first one left out, summed
over the processes. MFU counts the FLOPs LoRA training needs (`model_flops_per_token`) against the dense bf16 peak
of the GPUs used.

Suites: `attention` (the default: every model.attn_implementation on the 0.5B shape, sdpa against the mask-free
kernels on the 7B 4-bit shape, and auto with DDP over two GPUs if two are visible; about 8 minutes on one H100 or
H200) and `backends` (hf and unsloth, bf16 and 4-bit, on the 0.5B shape). A variant that cannot run on this machine
(a kernel not installed, one GPU only) is listed as skipped, with the reason.

Run on a CUDA machine, after `make setup LOCK=requirements/lock-cuda.txt` (`make flash-attention-4`, `make unsloth`
for those rows):
    python bench/train_throughput.py --out build/bench
Check the script itself on a CPU in about a minute (a tiny model, fp32; the GPU variants are skipped):
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
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from friction import attention  # noqa: E402
from friction.pipeline import stage_argv  # noqa: E402
from friction.schemas import PACKED_SCHEMA  # noqa: E402
from friction.tiny_model import build_tiny_model, corpus_from_jsonl  # noqa: E402

# Published configs; the tokenizer stays tiny, its ids all fall in the first rows of the embedding.
QWEN2_5_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)
QWEN2_5_7B = dict(  # DeepSeek-R1-Distill-Qwen-7B's shape
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
SHAPES = {"0.5b": QWEN2_5_0_5B, "7b": QWEN2_5_7B}
STEPS = {"0.5b": 10, "7b": 5}  # per variant; the first step is warm-up. Sized for the attention suite's 8 minutes.
FLOPS_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


@dataclass(frozen=True)
class Variant:
    name: str
    shape: str
    changes: dict = field(default_factory=dict)  # params.yaml sections to override
    gpus: int = 1

    @property
    def attention(self) -> str:
        return self.changes.get("model", {}).get("attn_implementation", "auto")

    @property
    def four_bit(self) -> bool:
        return self.changes.get("model", {}).get("load_in_4bit", False)


def variant(name: str, shape: str, backend: str, four_bit: bool, attn: str = "auto", gpus: int = 1) -> Variant:
    changes = {
        "train": {"backend": backend, "gpus": gpus},
        "model": {"load_in_4bit": four_bit, "attn_implementation": attn},
    }
    return Variant(name, shape, changes, gpus)


KERNELS = ("sdpa", "flex_attention", "varlen", "flash_attention_4")
SUITES = {
    "attention": [
        *(variant(f"0.5b-bf16-{kernel}", "0.5b", "hf", False, kernel) for kernel in KERNELS),
        *(variant(f"7b-4bit-{kernel}", "7b", "hf", True, kernel) for kernel in ("sdpa", "varlen", "flash_attention_4")),
        variant("0.5b-bf16-auto-2gpus", "0.5b", "hf", False, "auto", gpus=2),
    ],
    "backends": [
        variant("hf-bf16", "0.5b", "hf", False),
        variant("hf-4bit", "0.5b", "hf", True),
        variant("unsloth-bf16", "0.5b", "unsloth", False),
        variant("unsloth-4bit", "0.5b", "unsloth", True),
    ],
}
VARIANTS = {v.name: v for suite in SUITES.values() for v in suite}
# A CPU can run none of the CUDA paths: fp32, torch's AdamW, a short context, tiny bases.
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


def shaped_config(base: Path, shape: dict):
    """The config of the model in `base` with `shape`'s fields, and every field derived from them derived anew.

    Qwen2Config derives `layer_types` (one entry per layer) from `num_hidden_layers` when it is built; a config whose
    `num_hidden_layers` is raised after that keeps the tiny model's two entries, and Qwen2Attention then raises
    IndexError at the third layer.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    derived = ("layer_types",)
    return type(config).from_dict({k: v for k, v in config.to_dict().items() if k not in derived} | shape)


def build_base(base: Path, shape: dict) -> None:
    """A base of `shape` with random weights and the demo's tiny tokenizer, in `base`; reused when it is there."""
    if base_has_shape(base, shape):
        return
    shutil.rmtree(base, ignore_errors=True)
    corpus = corpus_from_jsonl(sorted((REPO / "data/sources/demo").glob("*.jsonl")))
    build_tiny_model(corpus, base)
    if not shape:  # --smoke: the tiny model itself
        return
    from transformers import AutoModelForCausalLM

    config = shaped_config(base, shape)
    # Up to the 0.5B shape: initialised in fp32 on the CPU in seconds. 7.6B weights: in bf16 on the GPU (seconds,
    # where fp32 on the CPU takes minutes and 30 GB). Saved beside the tiny model's tokenizer in place of its weights.
    device, dtype = ("cuda", torch.bfloat16) if config.hidden_size >= 2048 else ("cpu", torch.float32)
    for weights in base.glob("model*.safetensors*"):
        weights.unlink()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(base)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def why_not_here(variant: Variant) -> str | None:
    """Why `variant` cannot run on this machine; None if it can."""
    if not torch.cuda.is_available():
        if variant.four_bit:
            return "4-bit loading needs a CUDA GPU"
        if variant.gpus > 1:
            return "DDP over GPUs needs CUDA GPUs"
        if variant.attention not in ("auto", "sdpa", "varlen"):  # varlen on a CPU: one SDPA call per document
            return f"{variant.attention} needs a CUDA GPU"
        return None
    if torch.cuda.device_count() < variant.gpus:
        return f"{variant.gpus} GPUs needed, {torch.cuda.device_count()} visible"
    if variant.attention in attention.MASK_FREE:
        return attention.MASK_FREE[variant.attention]()
    return None


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
    # `python -m stages train`: with train.gpus > 1 it restarts itself as torchrun (same
    # process), which runs each worker in a session of its own and stops them all when it is sent SIGTERM.
    command = [sys.executable, *stage_argv("train", REPO / "dvc.yaml")[1:]]
    process = subprocess.Popen(command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, failed = process.communicate(timeout=timeout)[0].decode(errors="replace"), process.returncode != 0
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            output = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
        log, failed = f"{output.decode(errors='replace')}\ntimed out after {timeout} s", True
    (workspace / "train.log").write_text(log)
    result = {"variant": name, "wall_s": round(time.perf_counter() - started, 1)}
    if failed:
        return result | {"error": log[-3000:]}
    return result | {"train": json.loads((workspace / "metrics/train.json").read_text())}


def table(results: list[dict], peak_tflops: float) -> str:
    """One row per variant; `vs sdpa` compares with the first row of the same shape (its sdpa run in the
    attention suite)."""
    first_of_shape: dict[str, float] = {}
    lines = [
        "| variant | attention | GPUs | tokens/s | vs first | s/step | peak GiB | MFU | final loss | device |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        name = result["variant"]
        if "skipped" in result:
            lines.append(f"| {name} | skipped: {result['skipped']} | | | | | | | | |")
            continue
        if "error" in result:
            lines.append(f"| {name} | failed: see {name}/train.log | | | | | | | | |")
            continue
        train, mfu = result["train"], result.get("mfu")
        rate = train["steady_tokens_per_s"]
        reference = first_of_shape.setdefault(result["shape"], rate)
        lines.append(
            f"| {name} | {train['attn_implementation']} | {train['processes']} | {rate:,.0f} | "
            f"{rate / reference:.2f} | {train['step_seconds_median']:.3f} | "
            f"{train['peak_memory_mb'] / 1024:.1f} | {f'{mfu:.1%}' if mfu is not None else 'n/a'} | "
            f"{train['final_train_loss']:.3f} | {train['device']} |"
        )
    notes = f"MFU against {peak_tflops:g} TFLOP/s dense bf16 per GPU; peak GiB: the first process's."
    return "\n".join(lines) + "\n\n" + notes


def measure(
    chosen: Variant,
    shape_steps: int,
    smoke: bool,
    length: int,
    rows_per_step: int,
    out: Path,
    prepared: dict[str, tuple[Path, Path, dict, float]],
    timeout: int,
    peak_tflops: float,
    ceiling: float | None,
) -> dict:
    """Train `chosen` for `shape_steps` steps (its base and rows built on first use of its shape, kept in `prepared`)
    and add MFU to what train.json says."""
    name, shape_name = chosen.name, chosen.shape
    if shape_name not in prepared:
        base, packed = out / f"base-{shape_name}", out / f"packed-{shape_name}"
        build_base(base, {} if smoke else SHAPES[shape_name])  # smoke: the tiny demo model for every shape
        config = json.loads((base / "config.json").read_text())
        rng = np.random.default_rng(0)
        packed.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", shape_steps * rows_per_step), ("validation", rows_per_step)):
            pq.write_table(packed_rows(rows, length, rng, config["vocab_size"]), packed / f"{split}.parquet")
        prepared[shape_name] = (base, packed, config, attended_tokens_per_token(packed / "train.parquet"))
    base, packed, config, attended = prepared[shape_name]
    schedule = {"train": {"max_steps": shape_steps, "eval_steps": shape_steps, "logging_steps": 1}}
    click.echo(f"{name}: training {shape_steps} steps of {rows_per_step} rows x {length} tokens")
    changes = [chosen.changes, SMOKE if smoke else {}, schedule]
    result = run_variant(name, changes, out, base, packed, timeout) | {"shape": shape_name}
    if "train" in result:
        flops = model_flops_per_token(config, result["train"]["trainable_parameters"], attended)
        on_gpu = not result["train"]["device"].startswith("cpu")
        gpus_peak = peak_tflops * 1e12 * result["train"]["processes"]
        result |= {
            "base": {key: config[key] for key in FLOPS_KEYS},
            "flops_per_token": flops,
            "mfu": result["train"]["steady_tokens_per_s"] * flops / gpus_peak if on_gpu else None,
            "matmul_tflops": ceiling,
        }
    return result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), default="build/bench", show_default=True)
@click.option("--suite", type=click.Choice(list(SUITES)), default="attention", show_default=True)
@click.option("--variant", "variants", multiple=True, type=click.Choice(list(VARIANTS)), help="Default: the suite's.")
@click.option("--steps", type=int, default=None, help="Optimizer steps per variant [default: 10 for 0.5b, 5 for 7b].")
@click.option("--timeout", default=600, show_default=True, help="Seconds one variant may take.")
@click.option("--peak-tflops", default=H100_BF16_DENSE_TFLOPS, show_default=True, help="The GPU's dense bf16 peak.")
@click.option("--smoke", is_flag=True, help="Tiny bases on a CPU: checks this script, measures nothing useful.")
def main(
    out: Path, suite: str, variants: tuple[str, ...], steps: int | None, timeout: int, peak_tflops: float, smoke: bool
) -> None:
    """Train each variant for a few optimizer steps and print tokens/s, step time, peak memory and MFU."""
    chosen = [VARIANTS[name] for name in variants] if variants else SUITES[suite]
    yaml = YAML(typ="safe")
    card = yaml.load(REPO / "recipes/card.yaml")
    length = SMOKE["model"]["max_length"] if smoke else card["model"]["max_length"]
    rows_per_step = card["train"]["batch_size"] * card["train"]["grad_accum"]
    out.mkdir(parents=True, exist_ok=True)
    ceiling = matmul_tflops()
    if ceiling:
        click.echo(f"bf16 8192x8192x8192 matrix product: {ceiling:.0f} TFLOP/s")

    results: list[dict] = []
    prepared: dict[str, tuple[Path, Path, dict, float]] = {}  # shape -> base, packed rows, config, attended
    for chosen_variant in chosen:
        name, shape_name = chosen_variant.name, chosen_variant.shape
        reason = why_not_here(chosen_variant)
        if reason is not None:
            click.echo(f"{name}: skipped, {reason}")
            result = {"variant": name, "shape": shape_name, "skipped": reason}
        else:
            try:
                result = measure(
                    chosen_variant,
                    steps or STEPS[shape_name],
                    smoke,
                    length,
                    rows_per_step,
                    out,
                    prepared,
                    timeout,
                    peak_tflops,
                    ceiling,
                )
            except Exception:  # noqa: BLE001 - one variant that cannot be built or run must not cost the others
                error = traceback.format_exc()
                (out / name).mkdir(parents=True, exist_ok=True)
                (out / name / "train.log").write_text(error)
                result = {"variant": name, "shape": shape_name, "error": error[-3000:]}
            click.echo(result.get("error", "")[-1500:])
        results.append(result)
        with (out / "results.jsonl").open("a") as log:
            log.write(json.dumps(result) + "\n")
    summary = table(results, peak_tflops)
    (out / "results.md").write_text(summary + "\n")
    click.echo(summary)
    if any("error" in result for result in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
