"""Tests of stages.pack: assistant-only labels, the bin packers, overflow, and that packing leaves logits unchanged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SYSTEM_PROMPT, friction_row, reluctance_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import pack
from stages.chatml import IM_END
from stages.config import PackParams, Params
from stages.mix import friction_messages, reluctance_messages
from stages.pack import IGNORE_INDEX, best_fit_decreasing, next_fit, pack_split, tokenize

SHORT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nok\n</think>\nHello."},
]
# Two assistant turns, non-ASCII text, in the reluctance schema.
MULTI_TURN = reluctance_text("Should I text him tonight?", "They sound tired.", "Maybe wait? 🙂 Café first.") + (
    "<|im_start|>user\nWhy?\n<|im_end|>\n"
    "<|im_start|>assistant\n<judging>\nhm\n</judging>\nBecause (mostly) sleep.\n<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert loaded.is_fast
    return loaded


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return loaded.eval()


def conversations() -> list[list[dict[str, str]]]:
    return [
        friction_messages(friction_row("1"), SYSTEM_PROMPT),
        reluctance_messages({"text": MULTI_TURN}),
        SHORT,
        friction_messages(friction_row("2", answer="No. " * 5), "Be human."),
    ]


def with_pack(params: Params, max_length: int, strategy: str = "bfd", overflow: str = "truncate") -> Params:
    return params.model_copy(
        update={
            "model": params.model.model_copy(update={"max_length": max_length}),
            "pack": PackParams(strategy=strategy, overflow=overflow),
        }
    )


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of trained (non-ignored) labels."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


# --- labels -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(4))
def test_labels_decode_to_exactly_the_assistant_turns(tokenizer, index: int) -> None:
    messages = conversations()[index]
    tokens = tokenize(messages, tokenizer)
    assert len(tokens.labels) == len(tokens.input_ids)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(tokens.labels, tokens.input_ids))
    decoded = [tokenizer.decode(run) for run in labelled_runs(tokens.labels)]
    assert decoded == [f"{m['content']}\n{IM_END}" for m in messages if m["role"] == "assistant"]
    # ...and the untrained rest is the prompt side: system and user turns, role headers, newlines between turns.
    untrained = tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label == IGNORE_INDEX])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in untrained
    assert "<think>" not in untrained and "</think>" not in untrained


# --- the packers --------------------------------------------------------------------------------------------


def check_layout(rows: list[list[int]], lengths: list[int], capacity: int) -> None:
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every index exactly once
    assert all(row for row in rows)
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)


def random_cases(count: int) -> list[tuple[list[int], int]]:
    rng = random.Random(1234)
    cases = []
    for _ in range(count):
        capacity = rng.randint(8, 200)
        cases.append(([rng.randint(1, capacity) for _ in range(rng.randint(0, 40))], capacity))
    return cases


def test_best_fit_decreasing_hand_worked() -> None:
    # Longest first: 7 -> new row (3 left), 5 -> new row (5 left), 4 -> row 1 (1 left), 1 -> the fullest row it fits:
    # row 1, where first-fit would take row 0.
    assert best_fit_decreasing([5, 7, 1, 4], 10) == [[1], [0, 3, 2]]
    assert best_fit_decreasing([3, 7, 2, 6, 4], 10) == [[1, 0], [3, 4], [2]]
    assert best_fit_decreasing([6, 5, 5, 4], 10) == [[0, 3], [1, 2]]
    assert next_fit([6, 5, 5, 4], 10) == [[0], [1, 2], [3]]
    assert best_fit_decreasing([], 10) == [] == next_fit([], 10)
    assert best_fit_decreasing([10, 10], 10) == [[0], [1]] == next_fit([10, 10], 10)


def test_best_fit_decreasing_properties() -> None:
    total_bfd = total_nf = 0
    for lengths, capacity in random_cases(300):
        rows = best_fit_decreasing(lengths, capacity)
        check_layout(rows, lengths, capacity)
        loads = [sum(lengths[i] for i in row) for row in rows]
        # An any-fit packer opens a row only for an example that fits in no open row: no two rows could be merged.
        assert all(a + b > capacity for i, a in enumerate(loads) for b in loads[i + 1 :]), (lengths, capacity)
        nf_rows = len(next_fit(lengths, capacity))
        # Per list BFD <= 11/9 OPT + 6/9 <= 11/9 NF + 6/9 (it can lose to next-fit on an unlucky list, rarely).
        assert len(rows) <= 11 / 9 * nf_rows + 6 / 9
        total_bfd, total_nf = total_bfd + len(rows), total_nf + nf_rows
    assert total_bfd < total_nf


def test_best_fit_decreasing_is_tighter_than_next_fit_on_conversation_lengths() -> None:
    rng = random.Random(7)
    for _ in range(20):
        lengths = [rng.randint(60, 1500) for _ in range(300)]
        bfd, nf = best_fit_decreasing(lengths, 4096), next_fit(lengths, 4096)
        check_layout(bfd, lengths, 4096)
        assert len(bfd) <= len(nf)


def test_next_fit_keeps_order_and_starts_a_row_only_when_needed() -> None:
    for lengths, capacity in random_cases(300):
        rows = next_fit(lengths, capacity)
        check_layout(rows, lengths, capacity)
        assert [i for row in rows for i in row] == list(range(len(lengths)))
        for row, following in zip(rows, rows[1:]):
            assert sum(lengths[i] for i in row) + lengths[following[0]] > capacity


# --- pack_split: rows, metrics, overflow ----------------------------------------------------------------------


def overflow_examples() -> list[dict]:
    long_answer = friction_messages(friction_row("1", answer="I hear you, and I'm not sure. " * 30), SYSTEM_PROMPT)
    long_user = [
        {"role": "user", "content": "My sister never calls me back and " * 40},
        {"role": "assistant", "content": "<think>\nhm\n</think>\nOh."},
    ]
    return [{"messages": m} for m in (SHORT, long_answer, long_user, conversations()[1])]


@pytest.mark.parametrize(
    ("overflow", "expected"),
    [
        ("truncate", {"examples": 4, "packed_examples": 3, "truncated": 1, "dropped": 1}),
        ("drop", {"examples": 4, "packed_examples": 2, "truncated": 0, "dropped": 2}),
    ],
)
def test_overflow_is_counted(tokenizer, demo_params: Params, overflow: str, expected: dict) -> None:
    capacity = 128
    examples = overflow_examples()
    lengths = [len(tokenize(e["messages"], tokenizer).input_ids) for e in examples]
    assert lengths[0] + lengths[3] <= capacity < min(lengths[1], lengths[2])  # the test data is what it claims

    packed, metrics = pack_split(examples, tokenizer, with_pack(demo_params, capacity, overflow=overflow))

    assert {key: metrics[key] for key in expected} == expected
    row_lengths = [len(ids) for ids in packed["input_ids"]]
    kept_lengths = sorted(length for lengths_ in packed["seq_lengths"] for length in lengths_)
    assert kept_lengths == sorted([lengths[0], lengths[3]] + ([capacity] if overflow == "truncate" else []))
    assert metrics["rows"] == len(packed) == (2 if overflow == "truncate" else 1)
    assert metrics["real_tokens"] == sum(row_lengths) == sum(kept_lengths)
    assert metrics["padded_slots"] == len(packed) * capacity - sum(row_lengths)
    assert metrics["fill_ratio"] == round(sum(row_lengths) / (len(packed) * capacity), 4)
    assert metrics["trained_tokens"] == sum(label != IGNORE_INDEX for row in packed["labels"] for label in row)
    for ids, labels, seq_lengths in zip(packed["input_ids"], packed["labels"], packed["seq_lengths"]):
        assert len(ids) == len(labels) == sum(seq_lengths) <= capacity


@pytest.mark.parametrize("strategy", ["bfd", "stacked"])
def test_seq_lengths_per_strategy(tokenizer, demo_params: Params, strategy: str) -> None:
    examples = [{"messages": m} for m in conversations() * 3]
    lengths = [len(tokenize(e["messages"], tokenizer).input_ids) for e in examples]
    capacity = 256
    packed, metrics = pack_split(examples, tokenizer, with_pack(demo_params, capacity, strategy=strategy))

    assert metrics["packed_examples"] == len(examples) and metrics["truncated"] == metrics["dropped"] == 0
    for ids, labels, seq_lengths in zip(packed["input_ids"], packed["labels"], packed["seq_lengths"]):
        assert len(ids) == len(labels) == sum(seq_lengths) <= capacity
        if strategy == "stacked":
            assert len(seq_lengths) == 1
    if strategy == "bfd":
        assert sorted(n for row in packed["seq_lengths"] for n in row) == sorted(lengths)
    else:  # the original's stacking: in order, a new row when the next example would not fit
        assert [row[0] for row in packed["seq_lengths"]] == [
            sum(lengths[i] for i in row) for row in next_fit(lengths, capacity)
        ]
    assert sum(len(ids) for ids in packed["input_ids"]) == sum(lengths)


# --- the key correctness check: packing does not change what a model sees -------------------------------------


def positions(seq_lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in seq_lengths]).unsqueeze(0)


@torch.no_grad()
def test_packed_logits_equal_unpacked_logits(tokenizer, model, demo_params: Params) -> None:
    messages = conversations()
    alone = {}
    for m in messages:
        ids = tokenize(m, tokenizer).input_ids
        alone[tuple(ids)] = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]

    packed, _ = pack_split([{"messages": m} for m in messages], tokenizer, with_pack(demo_params, 1024))
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == len(messages)  # all in one row: a real test
    row = packed[0]
    ids = torch.tensor([row["input_ids"]])
    logits = model(input_ids=ids, position_ids=positions(row["seq_lengths"]), use_cache=False).logits[0]

    start = 0
    for length in row["seq_lengths"]:
        segment = tuple(row["input_ids"][start : start + length])
        assert segment in alone
        assert torch.allclose(logits[start : start + length], alone[segment], atol=1e-5), start
        start += length

    # Sensitivity: positions running on across the row (the original's stacking) change every later example.
    later = row["seq_lengths"][0]
    stacked = model(input_ids=ids, use_cache=False).logits[0]
    assert torch.allclose(stacked[:later], logits[:later], atol=1e-5)
    assert not torch.allclose(stacked[later:], logits[later:], atol=1e-3)


# --- run: files in, files out ---------------------------------------------------------------------------------


def write_mixed(root: Path, model_dir: Path, train: list, validation: list) -> None:
    (root / "data/mixed").mkdir(parents=True)
    for name, rows in (("train", train), ("validation", validation)):
        lines = [json.dumps({"id": str(i), "source": "s", "messages": m}) for i, m in enumerate(rows)]
        (root / f"data/mixed/{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "data/raw").mkdir(parents=True)
    base = {"location": str(model_dir), "requested_revision": None, "resolved_revision": None, "files": {}}
    (root / "data/raw/manifest.json").write_text(json.dumps({"sources": {}, "base_model": base}))


def run_pack(params: Params) -> None:
    pack.run(params, Path("data/mixed"), Path("data/raw/manifest.json"), Path("data/packed"), Path("metrics/pack.json"))


def test_run_writes_parquet_rows_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tokenizer, demo_params: Params
) -> None:
    monkeypatch.chdir(tmp_path)
    write_mixed(tmp_path, tiny_model_dir, conversations() * 2, conversations()[:2])
    run_pack(with_pack(demo_params, 256))

    assert sorted(p.name for p in (tmp_path / "data/packed").iterdir()) == ["train.parquet", "validation.parquet"]
    report = json.loads((tmp_path / "metrics/pack.json").read_text())
    assert (report["strategy"], report["max_length"]) == ("bfd", 256)
    for split, count in (("train", 8), ("validation", 2)):
        table = pq.read_table(tmp_path / f"data/packed/{split}.parquet").to_pylist()
        assert set(table[0]) == {"input_ids", "labels", "seq_lengths"}
        assert report[split]["packed_examples"] == count == sum(len(row["seq_lengths"]) for row in table)
        assert report[split]["rows"] == len(table)
        decoded = [tokenizer.decode(run) for row in table for run in labelled_runs(row["labels"])]
        assert all(text.startswith("<think>\n") and text.endswith(f"\n{IM_END}") for text in decoded)


def test_run_with_nothing_left_fails_and_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, demo_params: Params
) -> None:
    monkeypatch.chdir(tmp_path)
    examples = [m["messages"] for m in overflow_examples()[1:3]]  # both longer than 128 tokens
    write_mixed(tmp_path, tiny_model_dir, [SHORT], examples)

    expected = r"no validation rows left; see metrics/pack\.json and pack\.overflow"
    with pytest.raises(click.ClickException, match=expected):
        run_pack(with_pack(demo_params, 128, overflow="drop"))
    assert not (tmp_path / "data/packed").exists() and not (tmp_path / "data/.packed.partial").exists()
