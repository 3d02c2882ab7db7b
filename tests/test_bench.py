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
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench import train_throughput as bench
from conftest import REPO


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
    config = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 16, "vocab_size": 100}  # fmt: skip
    # Per layer: q and o 8x8 each, k and v 8x4 each, gate, up and down 8x16 each; the head 100x8.
    frozen = 2 * (64 + 64 + 32 + 32 + 3 * 128) + 800
    attention = 2 * 3 * (2 * 2 * 8 * 10.0)  # two layers, forward and twice that backward, 10 tokens attended
    assert bench.model_flops_per_token(config, lora_parameters=50, attended=10.0) == 4 * frozen + 6 * 50 + attention


def run_smoke(out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "bench/train_throughput.py"), "--smoke", "--out", str(out), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_the_script_trains_on_the_cpu_and_reports(tmp_path: Path):
    out = tmp_path / "bench"
    result = run_smoke(out, "--steps", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["variant"] == "hf-bf16" and row["mfu"] is None  # no MFU on a CPU
    assert row["train"]["steps"] == 4
    # Every step is 8 rows of 256 tokens, padding-free, and the median is over the last three steps.
    assert row["train"]["steady_tokens_per_s"] == pytest.approx(2048 / row["train"]["step_seconds_median"], rel=1e-3)
    assert "| hf-bf16 |" in result.stdout


def test_the_benchmark_model_has_qwen2_5_0_5b_size():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**bench.QWEN2_5_0_5B, tie_word_embeddings=True))
    assert model.num_parameters() == 494_032_768  # Qwen2.5-0.5B's published count


def test_a_variant_that_fails_is_reported_and_fails_the_script(tmp_path: Path):
    out = tmp_path / "bench"
    result = run_smoke(out, "--timeout", "1")
    assert result.returncode == 1
    assert "| hf-bf16 | failed: see hf-bf16/train.log |" in result.stdout
    assert (out / "hf-bf16/train.log").read_text().endswith("timed out after 1 s")
