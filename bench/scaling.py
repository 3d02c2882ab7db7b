"""Scaling of mix and pack: wall time and peak memory at growing numbers of synthetic examples of the demo's lengths
(bench/corpus.py), each stage a `friction` process of its own, and the fast tokenizer alone on the same texts (what
mix's time is bound by). The growth exponent between two sizes is log(t2 / t1) / log(n2 / n1): 1 is linear.

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
    demo_workspace,
    machine,
    run_measured,
    spread,
    stage_command,
)
from bench.corpus import SOURCES, write_sources

SCALING_PARAMS = {
    "data": {"sources": {name: {"path": f"data/sources/synthetic/{name}.jsonl", "format": source_format}
                         for name, source_format in SOURCES.items()}},
    "mix": {"target_max": 10**9},  # every clean row goes through: the mix asks for 90 % of them
}  # fmt: skip


def tokenizer_alone(workspace: Path) -> float:
    """Seconds the base's fast tokenizer takes for every clean row's text, in mix's batches, nothing else."""
    sys.path.insert(0, str(workspace))
    from stages.config import load_params
    from stages.mix import ENCODE_BATCH, base_tokenizer, read_source

    params = load_params(workspace / "params.yaml")
    texts = []
    for name, source in params.data.sources.items():
        examples, _ = read_source(workspace / "data/raw" / f"{name}.jsonl", name, source.format, params.mix.system_prompt)
        texts += [example.text for example in examples]
    tokenizer = base_tokenizer(workspace / "data/raw/manifest.json")
    start = time.perf_counter()
    for first in range(0, len(texts), ENCODE_BATCH):
        tokenizer(texts[first : first + ENCODE_BATCH], return_offsets_mapping=True)
    return time.perf_counter() - start


def measure(workspace: Path, size: int, runs: int) -> dict[str, Any]:
    write_sources(workspace / "data/sources/synthetic", size, seed=size)
    run_measured(stage_command("fetch"), workspace)
    stages: dict[str, list[Any]] = {"mix": [], "pack": [], "tokenizer": []}
    for _ in range(runs):  # mix, pack and the tokenizer alone take turns, so load from elsewhere hits all three
        for stage in ("mix", "pack"):
            stages[stage].append(run_measured(stage_command(stage), workspace))
        tokenizer = run_measured([sys.executable, __file__, "tokenizer-alone", str(workspace)], workspace)
        stages["tokenizer"].append(float(tokenizer.output.strip().splitlines()[-1]))
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
        "mix_peak_gib": spread([run.peak_rss_gib for run in stages["mix"]]),
        "pack_peak_gib": spread([run.peak_rss_gib for run in stages["pack"]]),
    }


def growth(points: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The exponent of time in examples between consecutive sizes (1: linear)."""
    return [
        {"from": a["examples"], "to": b["examples"],
         "exponent": round(math.log(b[key]["median"] / a[key]["median"]) / math.log(b["examples"] / a["examples"]), 3)}
        for a, b in itertools.pairwise(points)
    ]  # fmt: skip


def run(sizes: list[int], runs: int, single_run_from: int, scratch: Path) -> dict[str, Any]:
    workspace = demo_workspace(scratch / "scaling", SCALING_PARAMS)
    points = []
    for size in sizes:
        started = time.perf_counter()
        points.append(measure(workspace, size, 1 if size >= single_run_from else runs))
        click.echo(f"scaling: {size} examples measured in {time.perf_counter() - started:.0f} s", err=True)
    per_thousand = [
        {"from": a["examples"], "to": b["examples"],
         "mix_gib": (b["mix_peak_gib"]["median"] - a["mix_peak_gib"]["median"]) / (b["examples"] - a["examples"]) * 1000,
         "pack_gib": (b["pack_peak_gib"]["median"] - a["pack_peak_gib"]["median"]) / (b["examples"] - a["examples"]) * 1000}
        for a, b in itertools.pairwise(points)
    ]  # fmt: skip
    return {
        "points": points,
        "mix_growth": growth(points, "mix_seconds"),
        "pack_growth": growth(points, "pack_seconds"),
        "memory_per_1000_examples": per_thousand,
    }


@click.group(invoke_without_command=True)
@click.option("--sizes", default="10000,100000,1000000", help="Numbers of examples, comma-separated.")
@click.option("--runs", default=3, help="Runs per size (median and range).")
@click.option("--single-run-from", default=1_000_000, help="Sizes from this one are run once.")
@click.option("--scratch", type=click.Path(path_type=Path), default=Path("build/bench/scratch"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/bench/scaling.json"))
@click.pass_context
def main(context: click.Context, sizes: str, runs: int, single_run_from: int, scratch: Path, out: Path) -> None:
    if context.invoked_subcommand:
        return
    result = {"machine": machine(), "scaling": run([int(s) for s in sizes.split(",")], runs, single_run_from, scratch)}
    result["machine_after"] = {"load_average": machine()["load_average"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    click.echo(json.dumps(result["scaling"], indent=1))


@main.command("tokenizer-alone")
@click.argument("workspace", type=click.Path(path_type=Path))
def tokenizer_alone_command(workspace: Path) -> None:
    click.echo(tokenizer_alone(workspace))


if __name__ == "__main__":
    main()
