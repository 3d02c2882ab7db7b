"""The pipeline on the demo, as `make demo` runs it: each stage's time in one `dvc repro`, a no-op `dvc repro` against
`dvc status`, tokenization passes per example counted over every stage, and evaluation's batched generation against
one prompt at a time.

Tokenization is counted by a probe (bench/probe/sitecustomize.py) that logs every text the fast tokenizer encodes in a
`friction` process; an example's pass count is how many logged texts are exactly its text (data/mixed's `text`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.common import (
    REPO,
    bench_env,
    interleaved,
    ratio,
    run_measured,
    spread,
    stage_command,
)
from friction.config import load_params
from friction.demo import update_params

PROBE = Path(__file__).resolve().parent / "probe"
STAGES = ["fetch", "mix", "pack", "train", "evaluate", "judge", "card"]


def probe_env(log: Path) -> dict[str, str]:
    return {"FRICTION_BENCH_PROBE": str(log), "PYTHONPATH": os.pathsep.join(filter(None, [str(PROBE), str(REPO)]))}


def timed_repro(workspace: Path, env: dict[str, str]) -> dict[str, float]:
    """One `dvc repro`, and the seconds from each stage's start to the next one's (the last one's to the end)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        ["dvc", "repro"],
        cwd=workspace,
        env={**bench_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    starts: list[tuple[str, float]] = []
    lines = []
    for line in process.stdout or []:
        lines.append(line)
        if line.startswith("Running stage '"):
            starts.append((line.split("'")[1], time.perf_counter()))
    if process.wait():
        raise RuntimeError("dvc repro failed:\n" + "".join(lines[-60:]))
    end = time.perf_counter()
    times = {name: (starts[i + 1][1] if i + 1 < len(starts) else end) - began for i, (name, began) in enumerate(starts)}
    return {**times, "total": end - start}


def tokenization_passes(workspace: Path, log: Path) -> dict[str, Any]:
    texts = [
        text
        for split in ("train", "validation")
        for text in pq.read_table(workspace / f"data/mixed/{split}.parquet", columns=["text"])["text"].to_pylist()
    ]
    import hashlib

    examples = {hashlib.sha256(text.encode()).hexdigest() for text in texts}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    tokenized = [record for record in records if "tokenized" in record]
    per_example = Counter(record["tokenized"] for record in tokenized if record["tokenized"] in examples)
    by_stage: dict[str, dict[str, int]] = {}
    for record in tokenized:
        counts = by_stage.setdefault(record["stage"], {"example_texts": 0, "other_texts": 0})
        counts["example_texts" if record["tokenized"] in examples else "other_texts"] += 1
    passes = [per_example.get(example, 0) for example in examples]
    return {
        "examples": len(examples),
        "min_passes": min(passes),
        "max_passes": max(passes),
        "mean_passes": sum(passes) / len(passes),
        "texts_tokenized_by_stage": by_stage,
    }


def probe_seconds(log: Path) -> Counter[str]:
    """The seconds each timer of the probe's log adds up to."""
    seconds: Counter[str] = Counter()
    for record in map(json.loads, log.read_text().splitlines()):
        if "timer" in record:
            seconds[record["timer"]] += record["seconds"]
    return seconds


def evaluation(workspace: Path, runs: int, scratch: Path) -> dict[str, Any]:
    """`python -m stages evaluate` answering one batch of the demo's `evaluate.batch_size` prompts, in that batch against one
    at a time: stage seconds, and the seconds in generation and in validation loss (from the probe)."""
    batch = load_params(workspace / "params.yaml").evaluate.batch_size
    original = (workspace / "params.yaml").read_text()
    timers: dict[str, list[dict[str, float]]] = {"batched": [], "one_at_a_time": []}

    def variant(name: str, batch_size: int) -> float:
        update_params(workspace / "params.yaml", {"evaluate": {"batch_size": batch_size, "max_prompts": batch}})
        log = scratch / f"eval-{name}-{len(timers[name])}.jsonl"
        log.unlink(missing_ok=True)
        command = stage_command("evaluate", samples=scratch / "samples.jsonl", metrics=scratch / "evaluate.json")
        run = run_measured(command, workspace, probe_env(log))
        timers[name].append(dict(probe_seconds(log)))
        return run.seconds

    try:
        stage = interleaved(
            runs, batched=lambda: variant("batched", batch), one_at_a_time=lambda: variant("one_at_a_time", 1)
        )
    finally:
        (workspace / "params.yaml").write_text(original)
    generation = {name: [t["generate"] for t in values] for name, values in timers.items()}
    loss = {name: [t["validation_loss"] for t in values] for name, values in timers.items()}
    generation_spread = {name: spread(values) for name, values in generation.items()}
    return {
        "prompts": batch,
        "stage_seconds": stage,
        "generation_seconds": generation_spread,
        "validation_loss_seconds": {name: spread(values) for name, values in loss.items()},
        "one_at_a_time_over_batched_generation": ratio(
            generation_spread["one_at_a_time"], generation_spread["batched"]
        ),
    }


def run(scratch: Path, runs: int) -> dict[str, Any]:
    workspace = scratch / "pipeline"
    log = scratch / "tokenization.jsonl"
    log.unlink(missing_ok=True)
    built = run_measured(["friction", "demo-workspace", str(workspace)], REPO)  # the tiny base is most of it
    stages = timed_repro(workspace, probe_env(log))
    passes = tokenization_passes(workspace, log)
    noop = interleaved(
        runs,
        repro=lambda: run_measured(["dvc", "repro"], workspace).seconds,
        status=lambda: run_measured(["dvc", "status"], workspace).seconds,
    )
    return {
        "make_demo_seconds": {"workspace": built.seconds, **stages},
        "noop_repro_vs_status": {**noop, "repro_over_status": ratio(noop["repro"], noop["status"])},
        "tokenization": passes,
        "evaluation": evaluation(workspace, runs, scratch),
    }
