"""Scaling of mix and pack: wall time and peak memory at growing numbers of synthetic examples of the demo's lengths
(bench/corpus.py), each stage a `friction` process of its own, and the seconds mix spends inside the fast tokenizer's
encoding (timed by bench/probe in the same run: what mix's time should be bound by). The growth exponent between two
sizes is log(t2 / t1) / log(n2 / n1): 1 is linear.

    python bench/scaling.py --sizes 10000,100000,1000000 --runs 3 --out build/bench/scaling.json
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    machine,
    run_measured,
    spread,
    stage_command,
)
from bench.corpus import SOURCES, write_sources
from bench.pipeline import probe_env, probe_seconds
from friction.demo import build_workspace

NO_HASHES = {"FRICTION_BENCH_PROBE_HASHES": "0"}  # only the encoding's seconds: a digest of every text would cost more

SCALING_PARAMS = {
    "data": {
        "sources": {
            name: {"path": f"data/sources/synthetic/{name}.jsonl", "format": source_format}
            for name, source_format in SOURCES.items()
        }
    },
    "mix": {"target_max": 10**9},  # every clean row goes through: the mix asks for 90 % of them
}


def measure(workspace: Path, size: int, runs: int) -> dict[str, Any]:
    write_sources(workspace / "data/sources/synthetic", size, seed=size)
    run_measured(stage_command("fetch"), workspace)
    stages: dict[str, list[Any]] = {"mix": [], "pack": [], "tokenizer": []}
    for attempt in range(runs):
        log = workspace / f"probe-{size}-{attempt}.jsonl"
        stages["mix"].append(run_measured(stage_command("mix"), workspace, {**probe_env(log), **NO_HASHES}))
        stages["tokenizer"].append(probe_seconds(log)["encode_texts"])
        stages["pack"].append(run_measured(stage_command("pack"), workspace))
    report = json.loads((workspace / "metrics/pack.json").read_text())
    mixed = json.loads((workspace / "metrics/mix.json").read_text())
    return {
        "examples": size,
        "mixed": mixed["train"] + mixed["validation"],
        "packed_rows": report["train"]["rows"] + report["validation"]["rows"],
        "real_tokens": report["train"]["real_tokens"] + report["validation"]["real_tokens"],
        "mix_seconds": spread([run.seconds for run in stages["mix"]]),
        "pack_seconds": spread([run.seconds for run in stages["pack"]]),
        "tokenizer_seconds": spread(stages["tokenizer"]),
        "tokenizer_share": spread([t / run.seconds for t, run in zip(stages["tokenizer"], stages["mix"], strict=True)]),
        "mix_peak_gib": spread([run.peak_rss_gib for run in stages["mix"]]),
        "pack_peak_gib": spread([run.peak_rss_gib for run in stages["pack"]]),
    }


def growth(points: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The exponent of time in examples between consecutive sizes (1: linear)."""
    return [
        {
            "from": a["examples"],
            "to": b["examples"],
            "exponent": round(
                math.log(b[key]["median"] / a[key]["median"]) / math.log(b["examples"] / a["examples"]), 3
            ),
        }
        for a, b in itertools.pairwise(points)
    ]


def run(sizes: list[int], runs: int, single_run_from: int, scratch: Path) -> dict[str, Any]:
    workspace = build_workspace(scratch / "scaling", SCALING_PARAMS)
    points = []
    for size in sizes:
        started = time.perf_counter()
        points.append(measure(workspace, size, 1 if size >= single_run_from else runs))
        click.echo(f"scaling: {size} examples measured in {time.perf_counter() - started:.0f} s", err=True)
    per_thousand = [
        {
            "from": a["examples"],
            "to": b["examples"],
            "mix_gib": (b["mix_peak_gib"]["median"] - a["mix_peak_gib"]["median"])
            / (b["examples"] - a["examples"])
            * 1000,
            "pack_gib": (b["pack_peak_gib"]["median"] - a["pack_peak_gib"]["median"])
            / (b["examples"] - a["examples"])
            * 1000,
        }
        for a, b in itertools.pairwise(points)
    ]
    return {
        "points": points,
        "mix_growth": growth(points, "mix_seconds"),
        "pack_growth": growth(points, "pack_seconds"),
        "memory_per_1000_examples": per_thousand,
    }


@click.command()
@click.option("--sizes", default="10000,100000,1000000", help="Numbers of examples, comma-separated.")
@click.option("--runs", default=3, help="Runs per size (median and range).")
@click.option("--single-run-from", default=1_000_000, help="Sizes from this one are run once.")
@click.option("--scratch", type=click.Path(path_type=Path), default=Path("build/bench/scratch"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/bench/scaling.json"))
def main(sizes: str, runs: int, single_run_from: int, scratch: Path, out: Path) -> None:
    result = {"machine": machine(), "scaling": run([int(s) for s in sizes.split(",")], runs, single_run_from, scratch)}
    result["machine_after"] = {"load_average": machine()["load_average"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    click.echo(json.dumps(result["scaling"], indent=1))


if __name__ == "__main__":
    main()
