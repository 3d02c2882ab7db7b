"""`make bench`: the CPU benchmarks (bench/packing.py, training.py, pipeline.py, scaling.py) in one run, their raw JSON
in bench/results/, and BENCHMARKS.md's CPU section rewritten from it (bench/report.py).

    python bench/run.py                                   # what make bench runs
    python bench/run.py --only scaling --scaling-sizes 10000,100000 --resume bench/results/cpu-....json   # a part again
    python bench/run.py --render bench/results/cpu-....json    # only rewrite BENCHMARKS.md from a result
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import packing, pipeline, report, scaling, training  # noqa: E402
from bench.common import REPO, machine  # noqa: E402
from friction.config import load_params  # noqa: E402


@click.command()
@click.option("--runs", default=3, help="Interleaved rounds per comparison (median and range).")
@click.option("--scaling-sizes", default="10000,100000,1000000", help="Examples for the scaling of mix and pack.")
@click.option("--single-run-from", default=100_000, help="Scaling sizes from this one are measured once.")
@click.option("--scratch", type=click.Path(path_type=Path), default=REPO / "build/bench/scratch")
@click.option("--results", type=click.Path(path_type=Path), default=REPO / "bench/results")
@click.option("--benchmarks", type=click.Path(path_type=Path), default=REPO / "BENCHMARKS.md")
@click.option(
    "--only",
    default="pipeline,packing,training,scaling",
    help="Parts to run, comma-separated; with --resume the others are kept from that result.",
)
@click.option(
    "--resume",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A result file to add the parts run to.",
)
@click.option(
    "--render",
    "render_only",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Rewrite BENCHMARKS.md's CPU section from this result file and stop.",
)
def main(
    runs: int,
    scaling_sizes: str,
    single_run_from: int,
    scratch: Path,
    results: Path,
    benchmarks: Path,
    only: str,
    resume: Path | None,
    render_only: Path | None,
) -> None:
    if render_only:
        report.update_benchmarks(
            benchmarks, json.loads(render_only.read_text()), render_only.resolve().relative_to(REPO)
        )
        return
    result: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "seconds": {}}
    if resume:
        result = json.loads(resume.read_text())
    parts = only.split(",")

    results.mkdir(parents=True, exist_ok=True)
    path = results / f"cpu-{result['started'][:10]}.json"

    def part(name: str, function) -> None:
        if name not in parts:
            return
        began = time.perf_counter()
        click.echo(f"bench: {name} ...", err=True)
        result[name] = function()
        result["seconds"][name] = round(time.perf_counter() - began, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")  # what is measured survives a later part's failure
        click.echo(f"bench: {name} done in {result['seconds'][name]} s", err=True)

    demo = load_params(REPO / "recipes/demo.yaml")
    part("pipeline", lambda: pipeline.run(scratch, runs))
    part("packing", lambda: packing.run(demo, scratch / "pipeline/data/mixed", runs))
    part("training", lambda: training.run(scratch, runs))
    sizes = [int(size) for size in scaling_sizes.split(",")]
    part("scaling", lambda: scaling.run(sizes, runs, single_run_from, scratch))
    result["seconds"]["total"] = round(sum(value for key, value in result["seconds"].items() if key != "total"), 1)
    result["load_average_after"] = machine()["load_average"]

    path.write_text(json.dumps(result, indent=1) + "\n")
    if not all(name in result for name in ("pipeline", "packing", "scaling")):
        click.echo(f"bench: {path} holds only {', '.join(parts)}; BENCHMARKS.md left as it is", err=True)
        return
    report.update_benchmarks(benchmarks, result, path.relative_to(REPO))
    click.echo(f"bench: {result['seconds']['total']} s; raw results {path}; {benchmarks} updated", err=True)


if __name__ == "__main__":
    main()
