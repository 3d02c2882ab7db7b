"""Tests of stages.pack: the bin packers, over-length examples, both strategies' masking, that packing leaves logits
unchanged, and files in and out, on hand-made pieces and on the real pipeline's output."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SYSTEM_PROMPT, friction_row, labelled_runs, reluctance_text
from transformers import AutoModelForCausalLM

from friction import packing, source_rows
from friction.chatml import IGNORE_INDEX, IM_END, IM_START, assistant_spans, render
from friction.config import PackParams, Params
from friction.mixing import Encoded, tokenize, write_parquet
from friction.packing import Piece, best_fit_decreasing, next_fit, pack_split
from friction.source_rows import friction_text
from friction.token_store import TokenStore
from friction.tokens import load_tokenizer
from stages import pack

SHORT = render(
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nok\n</think>\nHello."},
    ]
)
# Two assistant turns, non-ASCII text, in the reluctance schema.
MULTI_TURN = reluctance_text("Should I text him tonight?", "They sound tired.", "Maybe wait? 🙂 Café first.") + (
    "<|im_start|>user\nWhy?\n<|im_end|>\n"
    "<|im_start|>assistant\n<judging>\nhm\n</judging>\nBecause (mostly) sleep.\n<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir, None)  # as mix loads it


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return loaded.eval()


def conversations() -> list[str]:
    return [
        friction_text(friction_row("1"), SYSTEM_PROMPT),
        source_rows.reluctance_text({"text": MULTI_TURN}),
        SHORT,
        friction_text(friction_row("2", answer="No. " * 5), "Be human."),
    ]


def pieces_of(texts: list[str], tokenizer) -> list[Piece]:
    """What pack reads from mix's output: token ids, labels and user turn starts, tokenized by mix."""
    return [tokenize(text, tokenizer) for text in texts]


def assistant_turns(text: str) -> list[str]:
    return [text[start:end] for start, end in assistant_spans(text)]


def with_pack(params: Params, max_length: int, strategy: str = "bfd", overflow: str = "truncate") -> Params:
    return params.model_copy(
        update={
            "model": params.model.model_copy(update={"max_length": max_length}),
            "pack": PackParams(strategy=strategy, overflow=overflow),
        }
    )


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """A packed row's (input_ids, labels) per example, by its seq_lengths."""
    out, start = [], 0
    for length in row["seq_lengths"]:
        out.append((row["input_ids"][start : start + length], row["labels"][start : start + length]))
        start += length
    return out


def rows_of(packed: dict[str, list]) -> list[dict]:
    return [dict(zip(packed, values)) for values in zip(*packed.values())]


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
        for row, following in itertools.pairwise(rows):
            assert sum(lengths[i] for i in row) + lengths[following[0]] > capacity


# --- over-length examples -------------------------------------------------------------------------------------

X = IGNORE_INDEX
# 10 tokens: a prompt (user turn at 2) over tokens 0-5, an assistant turn over 6-9.
PROMPT_FIRST = Piece(list(range(10, 20)), [X] * 6 + [16, 17, 18, 19], [2])
# 6 tokens, labelled at once (a piece of a longer example may start inside an assistant turn).
ANSWER_FIRST = Piece([30, 31, 32, 33, 34, 35], [30, 31, 32, X, X, X], [4])
FITS = Piece([40, 41, 42], [X, 41, 42], [0])


def test_split_cuts_consecutive_pieces_and_drops_those_without_labels() -> None:
    pieces, counts = packing.fit([PROMPT_FIRST, ANSWER_FIRST, FITS], 4, "split")
    # PROMPT_FIRST -> [10..13] (no label: dropped), [14..17], [18, 19]; ANSWER_FIRST -> [30..33], [34, 35] (dropped).
    assert pieces == [
        Piece([14, 15, 16, 17], [X, X, 16, 17], []),
        Piece([18, 19], [18, 19], []),
        Piece([30, 31, 32, 33], [30, 31, 32, X], []),
        FITS,
    ]
    assert counts == {"split": 2, "split_pieces": 5, "dropped_without_labels": 2, "truncated": 0}
    # A piece keeps the user turns that start inside it, counted from its own start.
    assert PROMPT_FIRST.cut(0, 4).user_starts == [2] and ANSWER_FIRST.cut(4, 8).user_starts == [0]


def test_truncate_keeps_the_first_tokens_and_counts_a_cut_then_dropped_example_once() -> None:
    pieces, counts = packing.fit([PROMPT_FIRST, ANSWER_FIRST, FITS], 4, "truncate")
    assert pieces == [Piece([30, 31, 32, 33], [30, 31, 32, X], []), FITS]
    assert counts == {"truncated": 1, "dropped_without_labels": 1, "split": 0, "split_pieces": 0}


@pytest.mark.parametrize(
    ("overflow", "expected"),
    [
        ("truncate", {"examples": 4, "packed_examples": 3, "truncated": 1, "dropped_without_labels": 1}),
        ("split", {"examples": 4, "split": 2, "truncated": 0}),
    ],
)
def test_overflow_metrics_add_up(tokenizer, demo_params: Params, overflow: str, expected: dict) -> None:
    capacity = 144
    long_answer = friction_text(friction_row("1", answer="I hear you, and I'm not sure. " * 30), SYSTEM_PROMPT)
    long_user = render(
        [
            {"role": "user", "content": "My sister never calls me back and " * 40},
            {"role": "assistant", "content": "<think>\nhm\n</think>\nOh."},
        ]
    )
    examples = pieces_of([SHORT, long_answer, long_user, conversations()[1]], tokenizer)
    lengths = [len(e.input_ids) for e in examples]
    assert lengths[0] + lengths[3] <= capacity < min(lengths[1], lengths[2])  # the test data is what it claims

    packed, metrics = pack_split(examples, with_pack(demo_params, capacity, overflow=overflow))

    assert {key: metrics[key] for key in expected} == expected
    assert metrics["packed_examples"] == (
        metrics["examples"] - metrics["split"] + metrics["split_pieces"] - metrics["dropped_without_labels"]
    )
    row_lengths = [len(ids) for ids in packed["input_ids"]]
    assert sum(len(seq) for seq in packed["seq_lengths"]) == metrics["packed_examples"]
    assert metrics["rows"] == len(packed["input_ids"])
    assert metrics["real_tokens"] == sum(row_lengths)
    assert metrics["padded_slots"] == metrics["rows"] * capacity - sum(row_lengths)
    assert metrics["fill_ratio"] == round(sum(row_lengths) / (metrics["rows"] * capacity), 4)
    assert metrics["trained_tokens"] == sum(label != IGNORE_INDEX for row in packed["labels"] for label in row)
    for row in rows_of(packed):
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= capacity
        assert all(any(label != IGNORE_INDEX for label in labels) for _, labels in segments(row))
    if overflow == "split":  # the long examples became their consecutive chunks that hold a label, whole
        kept = {(tuple(ids), tuple(labels)) for row in rows_of(packed) for ids, labels in segments(row)}
        for example in examples[1:3]:
            ids, labels = example.input_ids, example.labels
            starts = range(0, len(ids), capacity)
            chunks = [(tuple(ids[i : i + capacity]), tuple(labels[i : i + capacity])) for i in starts]
            labelled = [chunk for chunk in chunks if any(label != IGNORE_INDEX for label in chunk[1])]
            assert labelled and all(chunk in kept for chunk in labelled)


# --- strategies and masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["bfd", "stacked"])
def test_seq_lengths_per_strategy(tokenizer, demo_params: Params, strategy: str) -> None:
    examples = pieces_of(conversations() * 3, tokenizer)
    lengths = [len(e.input_ids) for e in examples]
    capacity = 256
    packed, metrics = pack_split(examples, with_pack(demo_params, capacity, strategy=strategy))

    assert metrics["packed_examples"] == len(examples) and metrics["truncated"] == 0
    for row in rows_of(packed):
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= capacity
        if strategy == "stacked":
            assert len(row["seq_lengths"]) == 1
    if strategy == "bfd":
        assert sorted(n for row in packed["seq_lengths"] for n in row) == sorted(lengths)
    else:  # the original's stacking: in order, a new row when the next example would not fit
        assert [row[0] for row in packed["seq_lengths"]] == [
            sum(lengths[i] for i in row) for row in next_fit(lengths, capacity)
        ]
    assert sum(len(ids) for ids in packed["input_ids"]) == sum(lengths)


def original_trained_text(text: str) -> list[str]:
    """The original's masking on a stacked row's text, found the way Unsloth's train_on_responses_only finds it: the
    text from the end of each "<|im_start|>assistant\\n" to the next "<|im_start|>user\\n", or the end."""
    trained = [False] * len(text)
    for match in re.finditer(re.escape(f"{IM_START}assistant\n"), text):
        user = text.find(f"{IM_START}user\n", match.end())
        end = user if user != -1 else len(text)
        trained[match.end() : end] = [True] * (end - match.end())
    return [
        "".join(char for _, char in run)
        for is_trained, run in itertools.groupby(zip(trained, text), key=lambda pair: pair[0])
        if is_trained
    ]


def test_stacked_masking_is_the_originals(tokenizer, demo_params: Params) -> None:
    stack = conversations()  # system + user, system + two rounds, no system, system + user
    bos = tokenizer.bos_token_id
    packed, _ = pack_split(pieces_of(stack, tokenizer), with_pack(demo_params, 1024, strategy="stacked"), bos)
    assert len(packed["input_ids"]) == 1  # one stack: a real test
    ids, labels = packed["input_ids"][0], packed["labels"][0]
    text = "".join(stack)
    # The original tokenized a stack as one text: one BOS, at the start of the row.
    assert ids[0] == bos and ids.count(bos) == 1 and packed["seq_lengths"] == [[len(ids)]]
    assert tokenizer.decode(ids[1:]) == text

    decoded = [tokenizer.decode(run) for run in labelled_runs(labels)]
    assert decoded == original_trained_text(text)
    # What that means: every assistant turn and the newline after it are trained, and so is the system turn of every
    # example after the first (the run of the example before only ends at its user turn) - not the first's.
    trained = "".join(decoded)
    assert f"{IM_START}system\nYou are careful.\n{IM_END}\n" in trained
    assert f"{IM_START}system\nBe human.\n{IM_END}\n" in trained
    assert SYSTEM_PROMPT not in trained  # example 1's system turn opens the row
    assert f"{IM_START}user\n" not in trained
    assert decoded[0].startswith("<think>\n") and decoded[-1].endswith(f"\n{IM_END}\n")


def test_bfd_masking_is_the_assistant_turns_only(tokenizer, demo_params: Params) -> None:
    packed, _ = pack_split(pieces_of(conversations(), tokenizer), with_pack(demo_params, 1024))
    decoded = [tokenizer.decode(run) for run in labelled_runs(packed["labels"][0])]
    assistant = [turn for text in conversations() for turn in assistant_turns(text)]
    assert sorted(decoded) == sorted(assistant)
    # bfd keeps every example's own BOS, as the base's tokenizer put it before every text.
    starts = itertools.accumulate([0] + packed["seq_lengths"][0][:-1])
    assert all(packed["input_ids"][0][start] == tokenizer.bos_token_id for start in starts)


# --- the key correctness check: packing does not change what a model sees -------------------------------------


def positions(seq_lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in seq_lengths]).unsqueeze(0)


@torch.no_grad()
def test_packed_logits_equal_unpacked_logits(tokenizer, model, demo_params: Params) -> None:
    examples = pieces_of(conversations(), tokenizer)
    alone = {}
    for example in examples:
        ids = example.input_ids
        alone[tuple(ids)] = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]

    packed, _ = pack_split(examples, with_pack(demo_params, 1024))
    assert len(packed["input_ids"]) == 1 and len(packed["seq_lengths"][0]) == len(examples)  # one row: a real test
    row = rows_of(packed)[0]
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


STORE = TokenStore()  # in memory


def encoded(row_id: str, text: str, tokens: Piece) -> Encoded:
    return Encoded(row_id, "s", 1, STORE.add([text], [tokens])[0], len(tokens.input_ids))


def write_mixed(root: Path, tokenizer, train: list, validation: list) -> None:
    (root / "data/mixed").mkdir(parents=True)
    for split, texts in (("train", train), ("validation", validation)):
        rows = [encoded(str(i), text, tokenize(text, tokenizer)) for i, text in enumerate(texts)]
        write_parquet(rows, STORE, root / f"data/mixed/{split}.parquet", tokenizer.bos_token_id)


def run_pack(params: Params) -> None:
    pack.run(params, Path("data/mixed"), Path("data/packed"), Path("metrics/pack.json"))


def test_run_writes_parquet_rows_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer, demo_params: Params
) -> None:
    monkeypatch.chdir(tmp_path)
    write_mixed(tmp_path, tokenizer, conversations() * 2, conversations()[:2])
    run_pack(with_pack(demo_params, 256))

    assert sorted(p.name for p in (tmp_path / "data/packed").iterdir()) == ["train.parquet", "validation.parquet"]
    report = json.loads((tmp_path / "metrics/pack.json").read_text())
    assert (report["strategy"], report["overflow"], report["max_length"]) == ("bfd", "truncate", 256)
    for split, count in (("train", 8), ("validation", 2)):
        table = pq.read_table(tmp_path / f"data/packed/{split}.parquet").to_pylist()
        assert set(table[0]) == {"input_ids", "labels", "seq_lengths"}
        assert report[split]["packed_examples"] == count == sum(len(row["seq_lengths"]) for row in table)
        assert report[split]["rows"] == len(table)
        decoded = [tokenizer.decode(run) for row in table for run in labelled_runs(row["labels"])]
        assert all(text.startswith("<think>\n") and text.endswith(f"\n{IM_END}") for text in decoded)


def test_run_packs_the_token_ids_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_params) -> None:
    """pack never tokenizes: ids no tokenizer would make come out exactly as mix wrote them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/mixed").mkdir(parents=True)
    for split in ("train", "validation"):
        pieces = [PROMPT_FIRST, FITS] if split == "train" else [ANSWER_FIRST]
        rows = [encoded(str(i), "", piece) for i, piece in enumerate(pieces)]
        write_parquet(rows, STORE, tmp_path / f"data/mixed/{split}.parquet", None)
    run_pack(with_pack(demo_params, 64))

    train = pq.read_table(tmp_path / "data/packed/train.parquet").to_pylist()
    assert train == [
        {
            "input_ids": PROMPT_FIRST.input_ids + FITS.input_ids,
            "labels": PROMPT_FIRST.labels + FITS.labels,
            "seq_lengths": [10, 3],
        }
    ]


def test_run_with_nothing_left_fails_and_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer, demo_params: Params
) -> None:
    monkeypatch.chdir(tmp_path)
    long_user = render(
        [
            {"role": "user", "content": "My sister never calls me back and " * 40},
            {"role": "assistant", "content": "<think>\nhm\n</think>\nOh."},
        ]
    )
    write_mixed(tmp_path, tokenizer, [SHORT], [long_user])  # truncation cuts off its whole assistant turn

    expected = r"no validation rows left: none of its 1 examples keeps a labelled token within model\.max_length 128"
    with pytest.raises(click.ClickException, match=expected):
        run_pack(with_pack(demo_params, 128))
    assert not (tmp_path / "data/packed").exists() and not (tmp_path / "data/.packed.partial").exists()
    assert not (tmp_path / "metrics/pack.json").exists()


def test_over_length_example_under_drop_means_mix_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_params: Params
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/mixed").mkdir(parents=True)
    write_parquet([encoded("a", "", FITS)], STORE, tmp_path / "data/mixed/train.parquet", None)
    write_parquet([encoded("b7", "", PROMPT_FIRST)], STORE, tmp_path / "data/mixed/validation.parquet", None)
    params = with_pack(demo_params, 64, overflow="drop")
    params = params.model_copy(update={"model": params.model.model_copy(update={"max_length": 8})})

    expected = r"data/mixed/validation\.parquet row 0 \(id b7\): 10 tokens, over model\.max_length 8 .* rerun mix"
    with pytest.raises(click.ClickException, match=expected):
        run_pack(params)
    assert not (tmp_path / "data/packed").exists()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (None, r"data/mixed/train\.parquet: missing; run the stage that writes it"),
        (pa.table({"id": ["a"], "input_ids": [[1]], "labels": [[1]]}), r"train\.parquet: no column 'user_starts'"),
        (
            pa.table({"id": ["a"], "input_ids": [[1, 2]], "labels": [[1]], "user_starts": [[]]}),
            r"train\.parquet row 0 \(id a\): 2 input_ids but 1 labels",
        ),
        ("not parquet", r"train\.parquet: not a readable Parquet file"),
        (
            pa.table({"id": ["a"], "input_ids": [["x"]], "labels": [[1]], "user_starts": [[]]}),
            r"train\.parquet: column 'input_ids' is list<element: string>, not lists of token ids; rerun mix",
        ),
    ],
)
def test_bad_mixed_files_name_the_file_and_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_params: Params, table, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/mixed").mkdir(parents=True)
    if isinstance(table, pa.Table):
        pq.write_table(table, tmp_path / "data/mixed/train.parquet")
    elif table is not None:
        (tmp_path / "data/mixed/train.parquet").write_text(table)
    with pytest.raises(click.ClickException, match=message):
        run_pack(demo_params)


# --- on the real pipeline's output: `python -m stages fetch`, `python -m stages mix`, `python -m stages pack` on the demo recipe ---------


def test_packed_bfd_rows_train_exactly_the_assistant_turns(demo_pipeline: Path, tokenizer, demo_params) -> None:
    max_length = demo_params.model.max_length
    mixed = [
        row
        for split in ("train", "validation")
        for row in pq.read_table(demo_pipeline / f"data/mixed/{split}.parquet").to_pylist()
    ]
    by_ids = {tuple(e["input_ids"][:max_length]): e for e in mixed}
    whole = 0
    for split in ("train", "validation"):
        for row in pq.read_table(demo_pipeline / f"data/packed/{split}.parquet").to_pylist():
            for ids, labels in segments(row):
                example = by_ids[tuple(ids)]  # every packed example is a mixed one, whole or truncated
                assert labels == example["labels"][: len(ids)]
                if len(ids) == len(example["input_ids"]):
                    whole += 1
                    decoded = [tokenizer.decode(run) for run in labelled_runs(labels)]
                    assert decoded == assistant_turns(example["text"])
    assert whole >= 10  # enough examples checked end to end


def test_mixed_labels_of_the_real_output_are_the_assistant_turns(demo_pipeline: Path, tokenizer) -> None:
    """Together with the test above: truncated examples are labelled exactly where their whole versions are."""
    for split in ("train", "validation"):
        for example in pq.read_table(demo_pipeline / f"data/mixed/{split}.parquet").to_pylist():
            decoded = [tokenizer.decode(run) for run in labelled_runs(example["labels"])]
            assert decoded == assistant_turns(example["text"])


def test_stacked_rows_of_the_real_output_follow_the_originals_masking(
    demo_pipeline: Path, tmp_path: Path, tokenizer, demo_params: Params
) -> None:
    params = with_pack(demo_params, 4096, strategy="stacked")  # room for whole examples: no truncation
    pack.run(params, demo_pipeline / "data/mixed", tmp_path / "packed", tmp_path / "pack.json")
    rows = pq.read_table(tmp_path / "packed/train.parquet").to_pylist()
    report = json.loads((tmp_path / "pack.json").read_text())
    assert all(len(row["seq_lengths"]) == 1 for row in rows)
    assert len(rows) < report["train"]["packed_examples"]  # stacks of several examples
    for row in rows:
        assert row["input_ids"].count(tokenizer.bos_token_id) == 1 and row["input_ids"][0] == tokenizer.bos_token_id
        text = tokenizer.decode(row["input_ids"])
        assert [tokenizer.decode(run) for run in labelled_runs(row["labels"])] == original_trained_text(text)
