"""bench/train_throughput.py: its rows, its FLOP count, and a run of the script itself on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO
from transformers import AutoModelForCausalLM

from bench import train_throughput as bench


def test_packed_rows_are_full_and_mask_each_documents_prompt():
    table = bench.packed_rows(rows=5, length=512, rng=np.random.default_rng(1), vocab=1000)
    for input_ids, labels, lengths in zip(*(table.column(name).to_pylist() for name in table.column_names)):
        assert len(input_ids) == len(labels) == sum(lengths) == 512
        assert all(length <= 256 for length in lengths)
        start = 0
        for length in lengths:
            document = labels[start : start + length]
            assert document[: length // 4] == [-100] * (length // 4)
            assert document[length // 4 :] == input_ids[start + length // 4 : start + length]
            start += length


def test_attention_span_counts_each_document_causally(tmp_path: Path):
    path = tmp_path / "rows.parquet"
    pq.write_table(bench.packed_rows(rows=1, length=4, rng=np.random.default_rng(0), vocab=10), path)
    lengths = pq.read_table(path).column("seq_lengths").to_pylist()[0]
    # A document of n tokens: its tokens see 1, 2, ..., n tokens.
    expected = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    assert bench.attended_tokens_per_token(path) == expected


def test_model_flops_count_frozen_weights_twice_over_and_lora_three_times():
    config = {
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 16,
        "vocab_size": 100,
    }
    # Per layer: q and o 8x8 each, k and v 8x4 each, gate, up and down 8x16 each; the head 100x8.
    frozen = 2 * (64 + 64 + 32 + 32 + 3 * 128) + 800
    attention = 2 * 3 * (2 * 2 * 8 * 10.0)  # two layers, forward and twice that backward, 10 tokens attended
    assert bench.model_flops_per_token(config, lora_parameters=50, attended=10.0) == 4 * frozen + 6 * 50 + attention


def run_smoke(out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "bench/train_throughput.py"), "--smoke", "--out", str(out), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.needs_triton  # trains with TRL
def test_the_script_trains_on_the_cpu_and_reports(tmp_path: Path):
    out = tmp_path / "bench"
    result = run_smoke(out, "--steps", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["variant"]: row for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert list(rows) == [variant.name for variant in bench.SUITES["attention"]]
    for attention in ("sdpa", "varlen"):  # the variants of the suite a CPU can run
        trained = rows.pop(f"0.5b-bf16-{attention}")
        assert trained["mfu"] is None  # no MFU on a CPU
        assert (trained["train"]["steps"], trained["train"]["attn_implementation"], trained["train"]["processes"]) == (
            4,
            attention,
            1,
        )
        # Every step is 8 rows of 256 tokens, padding-free, and the median is over the last three steps.
        assert trained["train"]["steady_tokens_per_s"] == pytest.approx(
            2048 / trained["train"]["step_seconds_median"], rel=1e-3
        )
        assert f"| 0.5b-bf16-{attention} | {attention} | 1 |" in result.stdout
    assert rows["0.5b-bf16-flex_attention"]["skipped"] == "flex_attention needs a CUDA GPU"
    assert rows["7b-4bit-sdpa"]["skipped"] == "4-bit loading needs a CUDA GPU"
    assert rows["0.5b-bf16-auto-2gpus"]["skipped"] == "DDP over GPUs needs CUDA GPUs"
    assert "| 7b-4bit-flash_attention_4 | skipped: 4-bit loading needs a CUDA GPU |" in result.stdout


@pytest.mark.parametrize(
    ("shape", "parameters"),
    [("0.5b", 494_032_768), ("7b", 7_615_616_512)],  # Qwen2.5-0.5B's and DeepSeek-R1-Distill-Qwen-7B's counts
)
def test_the_script_builds_each_shape_it_names(shape, parameters, tiny_model_dir):
    """The config the script builds a base from (the tiny base's, reshaped), built on the meta device."""
    config = bench.shaped_config(tiny_model_dir, bench.SHAPES[shape])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # Qwen2Attention reads layer_types[layer_idx]
    assert len(config.layer_types) == config.num_hidden_layers == len(model.model.layers)
    assert model.num_parameters() == parameters


def test_on_a_gpu_a_variant_is_skipped_only_for_a_reason_of_that_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reasons = {variant.name: bench.why_not_here(variant) for variant in bench.SUITES["attention"]}
    assert reasons["0.5b-bf16-auto-2gpus"] == "2 GPUs needed, 1 visible"
    assert reasons["7b-4bit-flash_attention_4"].startswith("flash-attn-4 is not installed")  # not here
    assert reasons["0.5b-bf16-varlen"] is None and reasons["7b-4bit-sdpa"] is None


def test_a_variant_that_fails_is_reported_and_fails_the_script(tmp_path: Path):
    out = tmp_path / "bench"
    result = run_smoke(out, "--timeout", "1", "--variant", "0.5b-bf16-sdpa")
    assert result.returncode == 1
    assert "| 0.5b-bf16-sdpa | failed: see 0.5b-bf16-sdpa/train.log |" in result.stdout
    assert (out / "0.5b-bf16-sdpa/train.log").read_text().endswith("timed out after 1 s")


@pytest.mark.needs_triton  # trains with TRL
def test_a_variant_that_cannot_be_built_leaves_the_others_measured(tmp_path: Path, monkeypatch):
    out, build_base, built = tmp_path / "bench", bench.build_base, []

    def build_base_failing_first(base: Path, shape: dict) -> None:
        built.append(base)
        if len(built) == 1:  # as the 7B shape's base failed before its layer_types was derived anew
            raise IndexError("list index out of range")
        build_base(base, shape)

    monkeypatch.setattr(bench, "build_base", build_base_failing_first)
    variants = ["--variant", "0.5b-bf16-sdpa", "--variant", "0.5b-bf16-varlen"]
    result = CliRunner().invoke(bench.main, ["--smoke", "--out", str(out), "--steps", "2", *variants])

    assert result.exit_code == 1, result.output
    rows = {row["variant"]: row for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "IndexError: list index out of range" in rows["0.5b-bf16-sdpa"]["error"]
    assert "IndexError" in (out / "0.5b-bf16-sdpa/train.log").read_text()
    assert rows["0.5b-bf16-varlen"]["train"]["steps"] == 2
    written = (out / "results.md").read_text()
    assert "| 0.5b-bf16-sdpa | failed: see 0.5b-bf16-sdpa/train.log |" in written
    assert "| 0.5b-bf16-varlen | varlen | 1 |" in written
