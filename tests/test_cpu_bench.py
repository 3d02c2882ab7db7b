"""The CPU benchmarks (make bench): the pieces that decide what they report, checked on small inputs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from bench import packing, pipeline, report
from bench.common import interleaved, ratio, stage_command
from friction.config import Params


def test_interleaved_runs_alternate_which_side_goes_first() -> None:
    order: list[str] = []
    result = interleaved(4, a=lambda: order.append("a") or 1.0, b=lambda: order.append("b") or 2.0)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert result["a"]["median"] == 1.0 and result["b"]["runs"] == [2.0] * 4
    assert ratio(result["b"], result["a"]) == {"median_ratio": 2.0, "min": 2.0, "max": 2.0}


def test_the_probe_counts_each_mixed_example_tokenized_once(
    demo_workspace: Callable[..., Path], tmp_path: Path
) -> None:
    """What make bench reports as tokenization passes, on a real `python -m stages mix` and `python -m stages pack`."""
    workspace = demo_workspace("probe", stages=("fetch",))
    log = tmp_path / "probe.jsonl"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        **pipeline.probe_env(log),
        "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}",
    }
    for stage in ("mix", "pack"):
        subprocess.run(stage_command(stage), cwd=workspace, env=env, check=True, capture_output=True)
    passes = pipeline.tokenization_passes(workspace, log)
    mixed = json.loads((workspace / "metrics/mix.json").read_text())
    assert passes["examples"] == mixed["train"] + mixed["validation"]
    assert passes["min_passes"] == passes["max_passes"] == 1
    assert set(passes["texts_tokenized_by_stage"]) == {"mix"}  # pack never tokenizes


def test_card_scale_corpus_packs_tighter_with_bfd_than_stacked(demo_params: Params) -> None:
    examples = packing.card_scale_examples()
    lengths = examples.offsets[1:] - examples.offsets[:-1]
    assert len(examples) == packing.CARD_EXAMPLES and lengths.max() <= 1300 and lengths.min() >= 250
    layouts = packing.layouts(examples, demo_params, None, packing.CARD_MAX_LENGTH)
    ours, original = layouts["ours_bfd"], layouts["original_stacked"]
    assert ours["real_tokens"] == original["real_tokens"] == lengths.sum()
    assert ours["rows"] < original["rows"] and ours["fill_ratio"] > original["fill_ratio"]


def committed_results() -> list[Path]:
    return sorted((REPO / "bench/results").glob("cpu-*.json"))


@pytest.mark.skipif(not committed_results(), reason="no make bench result committed yet")
def test_benchmarks_md_cpu_section_is_what_the_latest_raw_result_renders_to() -> None:
    latest = committed_results()[-1]
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text[text.index(report.START) : text.index(report.END) + len(report.END)] + "\n"
    assert section == report.section(json.loads(latest.read_text()), latest.relative_to(REPO))
