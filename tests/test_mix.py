"""Tests of stages.mix: the original text format, tokens and labels, every kind of dirty row (over-length ones
included), both weightings' arithmetic, the split, the report."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
from conftest import SYSTEM_PROMPT, friction_row, jsonl_bytes, labelled_runs, reluctance_text
from datasets import Dataset, concatenate_datasets

from friction import chatml, mixing, source_rows
from friction.chatml import IGNORE_INDEX, IM_START, assistant_spans, render
from friction.config import PackParams, Params
from friction.mixing import Encoded, tokenize
from friction.source_rows import BadRow, certainly_over_chars, friction_messages, friction_text
from friction.token_store import Stored
from friction.tokens import load_tokenizer
from stages import mix

# original-recipe.md section 3, verbatim.
ORIGINAL_FRICTION_TEMPLATE = (
    "<|im_start|>system\nYou are a human-like AI assistant.\n<|im_end|>\n<|im_start|>user\n{question}\n<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n{thoughts}\n</think>\n{final_answer}\n<|im_end|>\n"
)


def write_raw(raw_dir: Path, sources: dict[str, list]) -> None:
    """What fetch leaves: <name>.jsonl per source and a manifest whose row count skips blank lines; the base model is
    the `workspace` fixture's tiny model."""
    raw_dir.mkdir(parents=True)
    base = {"location": "data/sources/demo-base", "requested_revision": None, "resolved_revision": None, "files": {}}
    manifest = {"sources": {}, "base_model": base}
    for name, rows in sources.items():
        data = jsonl_bytes(rows)
        (raw_dir / f"{name}.jsonl").write_bytes(data)
        manifest["sources"][name] = {"rows": sum(1 for line in data.split(b"\n") if line.strip())}
    (raw_dir / "manifest.json").write_text(json.dumps(manifest))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_mixed(out: str = "data/mixed") -> list[dict]:
    """Both splits' examples, train first."""
    return [row for split in ("train", "validation") for row in pq.read_table(f"{out}/{split}.parquet").to_pylist()]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/demo-base").symlink_to(tiny_model_dir)
    return tmp_path


def run_mix(params: Params, out: str = "data/mixed", metrics: str = "metrics/mix.json") -> dict:
    mix.run(params, Path("data/raw"), Path("data/raw/manifest.json"), Path(out), Path(metrics))
    return json.loads(Path(metrics).read_text())


def with_overflow(params: Params, max_length: int, overflow: str) -> Params:
    return params.model_copy(
        update={
            "model": params.model.model_copy(update={"max_length": max_length}),
            "pack": PackParams(strategy=params.pack.strategy, overflow=overflow),
        }
    )


# --- formatting ----------------------------------------------------------------------------------------------


def test_friction_row_renders_exactly_as_the_original_template() -> None:
    row = {
        "id": "1739527200123",
        "question": "I keep thinking I should quit but",
        "agent_responses": [
            {"agent_type": "problem_framer", "thought_stream": "They sound tired.", "friction_moments": []},
            {"agent_type": "memory_activator", "thought_stream": "Money mattered last time.\nA lot."},
            {"agent_type": "synthesizer", "thought_stream": "Maybe not yet?"},
        ],
        "final_answer": "What would you miss?",
        "metadata": {"timestamp": "2025-02-14 10:00:00", "model": "x"},
    }
    text = friction_text(row, SYSTEM_PROMPT)
    spans = assistant_spans(text)
    assert text == ORIGINAL_FRICTION_TEMPLATE.format(
        question="I keep thinking I should quit but",
        thoughts="They sound tired.\n\nMoney mattered last time.\nA lot.\n\nMaybe not yet?",
        final_answer="What would you miss?",
    )
    assert [text[start:end] for start, end in spans] == [
        "<think>\nThey sound tired.\n\nMoney mattered last time.\nA lot.\n\nMaybe not yet?\n</think>\n"
        "What would you miss?\n<|im_end|>"
    ]


def test_system_prompt_comes_from_params() -> None:
    messages = friction_messages(friction_row("1"), "Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_reluctance_text_is_kept_verbatim_but_for_the_judging_tags() -> None:
    text = reluctance_text(
        "Write a Slack message that puts him in his place.", "He took credit. Anger is fair.", "Firm, not cruel?"
    )
    assert source_rows.reluctance_text({"text": text, "other": 1}) == text.replace("<judging>", "<think>").replace(
        "</judging>", "</think>"
    )


# Standard ChatML (no newline before <|im_end|>), text outside the turns, two assistant turns.
STANDARD_CHATML = (
    "Preamble the original kept.\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<judging>fine</judging>Hello.<|im_end|>\n"
    "<|im_start|>user\nHelp me lie to my boss.<|im_end|>\n"
    "<|im_start|>assistant\n<judging>\nhm\n</judging>\nI'd rather not.<|im_end|>"
)


def test_reluctance_standard_chatml_and_multi_turn_are_trained_verbatim() -> None:
    text = source_rows.reluctance_text({"text": STANDARD_CHATML})
    assert text == STANDARD_CHATML.replace("<judging>", "<think>").replace("</judging>", "</think>")
    assert [text[start:end] for start, end in assistant_spans(text)] == [
        "<think>fine</think>Hello.<|im_end|>",
        "<think>\nhm\n</think>\nI'd rather not.<|im_end|>",
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": reluctance_text("Hi", answer="Error: 429 Too Many Requests")}, "generator error in assistant turn"),
        ({"text": "<|im_start|>user\nHi\n<|im_end|>\n"}, "no assistant turn"),
        ({"text": "just some prose, no ChatML"}, "no assistant turn"),
        ({"text": reluctance_text("Hi", answer="  ")}, "empty assistant turn"),
        ({"text": reluctance_text("")}, "empty user turn"),
        ({"text": ""}, "empty field 'text'"),
        ({"text": ["a"]}, "field 'text' is list"),
        ({"prompt": "Hi"}, "missing field 'text'"),
        ({"text": None}, "missing field 'text'"),
        ({"text": reluctance_text("Hi", judging="a </judging> b")}, "a </judging> without its <judging>"),
        ({"text": reluctance_text("Hi", judging="<judging> nested")}, "a <judging> inside another"),
        ({"text": reluctance_text("Hi").replace("</judging>", "")}, "a <judging> that is never closed"),
        ({"text": reluctance_text("Hi <|im_end|> there")}, "4 <|im_end|> for 3 ChatML turns"),
        ({"text": reluctance_text("Hi").replace("Hi", "<|im_start|>assistant\nforged")}, "4 <|im_start|> for 3"),
        ({"text": reluctance_text("Hi") + "<|im_start|>assistant\nnever closed"}, "4 <|im_start|> for 3"),
    ],
)
def test_bad_reluctance_rows(row: dict, reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        source_rows.reluctance_text(row)


# --- dirty rows ---------------------------------------------------------------------------------------------


def dirty_sources() -> dict[str, list]:
    good = friction_row("a1")
    return {
        "fr_a": [
            good,  # 1
            friction_row("a2", answer="Error: The model is overloaded."),  # 2
            friction_row("a3", thoughts=("fine", " Error: timeout", "fine")),  # 3
            dict(good),  # 4 exact duplicate within the source
            {**friction_row("a5"), "question": ""},  # 5
            {**friction_row("a6"), "final_answer": " \n\t "},  # 6
            {k: v for k, v in friction_row("a7").items() if k != "final_answer"},  # 7
            {**friction_row("a8"), "question": 42},  # 8
            {**friction_row("a9"), "agent_responses": "all agents agreed"},  # 9
            '{"id": "a10", "question": "unterminated',  # 10
            b'{"id": "a11", "question": "caf\xe9"}',  # 11: latin-1, not UTF-8
            "[1, 2, 3]",  # 12
            "",  # blank line: not a row
            {**friction_row("a14"), "agent_responses": []},  # 14
            {**friction_row("a15"), "agent_responses": [{"agent_type": "problem_framer"}]},  # 15
            {**friction_row("a16"), "final_answer": None},  # 16: how a Hub table stores a missing field
            friction_row("a17"),  # 17
            friction_row("a18", answer="This is not an Error: a mention in the middle is fine."),  # 18
        ],
        "fr_b": [
            friction_row("b1"),  # 1
            friction_row("a17"),  # 2 exact duplicate of another source's row
        ],
        "re_a": [
            {"text": reluctance_text("Help me?")},  # 1
            {"text": reluctance_text("Help me now?", answer="Error: context length exceeded")},  # 2
            {"text": reluctance_text("Help me?")},  # 3 duplicate
            {"text": "<|im_start|>user\nHelp?\n<|im_end|>\n"},  # 4
            {"text": reluctance_text("Help me later?", answer="")},  # 5
            {"prompt": "Help?"},  # 6
        ],
        "re_b": [
            {"text": reluctance_text("Help me?")},  # 1 duplicate across reluctance sources
            {"text": reluctance_text("Something else?")},  # 2
        ],
    }


EXPECTED_DROPS = {
    "fr_a": {
        "duplicate": 1,
        "empty_field": 3,
        "generator_error": 2,
        "invalid_json": 1,
        "invalid_utf8": 1,
        "missing_field": 3,
        "wrong_type": 3,
    },
    "fr_b": {"duplicate": 1},
    "re_a": {"duplicate": 1, "empty_field": 1, "generator_error": 1, "missing_field": 1, "no_assistant_turn": 1},
    "re_b": {"duplicate": 1},
}


def test_every_dirty_row_is_dropped_with_a_reason_and_counted(workspace: Path, make_params: Callable) -> None:
    sources = dirty_sources()
    write_raw(Path("data/raw"), sources)
    # Ask for every clean row (weights of 1 each, capped) so the splits hold exactly the kept examples.
    report = run_mix(make_params(sources_format(sources), dict.fromkeys(sources, 1.0), target_fraction=1.0))

    kept = {"fr_a": ["a1", "a17", "a18"], "fr_b": ["b1"], "re_a": ["re_a:1"], "re_b": ["re_b:2"]}
    for name, rows in sources.items():
        counts = report["sources"][name]
        assert counts["dropped"] == EXPECTED_DROPS[name], name
        assert counts["rows_in"] == sum(1 for row in rows if row != "")
        assert counts["rows_in"] == counts["kept"] + sum(counts["dropped"].values())
        assert counts["kept"] == counts["available"] == len(kept[name])

    dropped = read_jsonl(Path("data/mixed/dropped.jsonl"))
    assert {(d["source"], d["line"]) for d in dropped if d["reason"] != "duplicate"} == {
        ("fr_a", n) for n in (2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16)
    } | {("re_a", n) for n in (2, 4, 5, 6)}
    duplicates = sorted((d["source"], d["line"], d["detail"]) for d in dropped if d["reason"] == "duplicate")
    assert duplicates == [  # like every other drop, a duplicate names its line, and the line of the row it repeats
        ("fr_a", 4, "duplicate of fr_a line 1 (id a1)"),
        ("fr_b", 2, "duplicate of fr_a line 17 (id a17)"),
        ("re_a", 3, "duplicate of re_a line 1 (id re_a:1)"),
        ("re_b", 1, "duplicate of re_a line 1 (id re_a:1)"),
    ]

    examples = read_mixed()
    assert sorted((e["source"], e["id"]) for e in examples) == sorted(
        (name, row_id) for name, ids in kept.items() for row_id in ids
    )
    for example in examples:  # nothing of a dropped row slipped through
        assert "Error:" not in example["text"].replace("not an Error: a mention", "")


def sources_format(sources: dict) -> dict[str, str]:
    return {name: "friction" if name.startswith("fr") else "reluctance" for name in sources}


def test_on_bad_rows_fail_names_the_file_and_line(workspace: Path, make_params: Callable) -> None:
    sources = dirty_sources()
    write_raw(Path("data/raw"), sources)
    params = make_params(sources_format(sources), on_bad_rows="fail")

    # The user's file (not its copy in data/raw) and its first bad line, whatever the reason.
    expected = r"^data/sources/fr_a\.jsonl line 2: generator_error: generator error"
    with pytest.raises(click.ClickException, match=expected):
        run_mix(params)
    assert not Path("data/mixed").exists() and not Path("metrics/mix.json").exists()


def test_on_bad_rows_fail_names_the_first_bad_line_in_file_order(workspace: Path, make_params: Callable) -> None:
    # Line 2 duplicates line 1 (found after cleaning), line 3 is invalid JSON (found while reading): line 2 comes first.
    write_raw(Path("data/raw"), {"fr_a": [friction_row("1"), friction_row("1"), "{oops"]})
    expected = r"^data/sources/fr_a\.jsonl line 2: duplicate: duplicate of fr_a line 1"
    with pytest.raises(click.ClickException, match=expected):
        run_mix(make_params({"fr_a": "friction"}, on_bad_rows="fail"))


def test_on_bad_rows_fail_on_a_duplicate_names_the_file_and_line(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), {"fr_a": [friction_row("1"), friction_row("2")], "fr_b": [friction_row("2")]})
    params = make_params(sources_format(["fr_a", "fr_b"]), on_bad_rows="fail")

    expected = r"data/sources/fr_b\.jsonl line 1: duplicate: duplicate of fr_a line 2"
    with pytest.raises(click.ClickException, match=expected):
        run_mix(params)


def test_on_bad_rows_fail_passes_clean_data(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), {"fr_a": [friction_row(str(i)) for i in range(10)]})
    report = run_mix(make_params({"fr_a": "friction"}, on_bad_rows="fail"))
    assert report["sources"]["fr_a"]["dropped"] == {} and report["sampled"] == 9


# --- sampling and split -------------------------------------------------------------------------------------


def sampling_sources() -> dict[str, list]:
    return {
        "fr_a": [friction_row(f"a{i}") for i in range(20)] + [friction_row("x", answer="Error: boom")] * 3,
        "re_b": [{"text": reluctance_text(f"Question {i}?")} for i in range(4)],
    }


@pytest.mark.parametrize(
    ("mix_params", "expected", "weights_sum"),
    [
        # 24 clean rows: asked = min(100, int(0.5 x 24)) = 12; a: int(12 x .5) = 6; b: 6 asked, only 4 -> capped.
        (
            {"target_max": 100, "target_fraction": 0.5, "weights": {"fr_a": 0.5, "re_b": 0.5}},
            {"asked": 12, "fr_a": (6, 6, False), "re_b": (6, 4, True)},
            1.0,
        ),
        # target_max binds: asked = min(8, 21) = 8; 4 each, nothing capped.
        (
            {"target_max": 8, "target_fraction": 0.9, "weights": {"fr_a": 0.5, "re_b": 0.5}},
            {"asked": 8, "fr_a": (4, 4, False), "re_b": (4, 4, False)},
            1.0,
        ),
        # Weights summing to 0.75 are not renormalised, only reported: a 6, b int(12 x .25) = 3.
        (
            {"target_max": 100, "target_fraction": 0.5, "weights": {"fr_a": 0.5, "re_b": 0.25}},
            {"asked": 12, "fr_a": (6, 6, False), "re_b": (3, 3, False)},
            0.75,
        ),
        # int(), not round(): asked = int(0.9 x 24) = 21; int(21 x .5) = 10 each; b capped at 4.
        (
            {"target_max": 100, "target_fraction": 0.9, "weights": {"fr_a": 0.5, "re_b": 0.5}},
            {"asked": 21, "fr_a": (10, 10, False), "re_b": (10, 4, True)},
            1.0,
        ),
        # A zero weight takes nothing; the capped source's shortfall is not made up from the other one.
        (
            {"target_max": 100, "target_fraction": 1.0, "weights": {"fr_a": 0.0, "re_b": 1.0}},
            {"asked": 24, "fr_a": (0, 0, False), "re_b": (24, 4, True)},
            1.0,
        ),
    ],
)
def test_sampling_arithmetic(
    workspace: Path, make_params: Callable, mix_params: dict, expected: dict, weights_sum: float
) -> None:
    write_raw(Path("data/raw"), sampling_sources())
    weights = mix_params.pop("weights")
    report = run_mix(make_params({"fr_a": "friction", "re_b": "reluctance"}, weights, **mix_params))

    assert report["available"] == 24  # clean rows: the three generator errors do not count
    assert report["asked"] == expected["asked"]
    assert report["weights_sum"] == weights_sum
    for name in ("fr_a", "re_b"):
        asked, sampled, capped = expected[name]
        counts = report["sources"][name]
        assert (counts["asked"], counts["sampled"], counts["capped"]) == (asked, sampled, capped), name
    total = expected["fr_a"][1] + expected["re_b"][1]
    assert report["sampled"] == total == report["train"] + report["validation"]

    train = pq.read_table("data/mixed/train.parquet").to_pylist()
    validation = pq.read_table("data/mixed/validation.parquet").to_pylist()
    assert (len(train), len(validation)) == (report["train"], report["validation"])
    assert validation, "a validation split of at least one example"
    keys = [(e["source"], e["id"]) for e in train + validation]
    assert len(set(keys)) == len(keys)  # no example twice, none in both splits
    assert not {e["id"] for e in train} & {e["id"] for e in validation}
    assert Counter(source for source, _ in keys) == Counter(
        {name: expected[name][1] for name in ("fr_a", "re_b") if expected[name][1]}
    )


def test_each_source_is_shuffled_before_it_is_cut(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), sampling_sources())
    picked = []
    for seed in (42, 43):
        params = make_params({"fr_a": "friction", "re_b": "reluctance"}, target_fraction=0.5)
        run_mix(params.model_copy(update={"seed": seed}), f"mixed-{seed}", f"mix-{seed}.json")
        examples = read_mixed(f"mixed-{seed}")
        picked.append({e["id"] for e in examples if e["source"] == "fr_a"})
    assert len(picked[0]) == len(picked[1]) == 6
    assert picked[0] != {f"a{i}" for i in range(6)}  # not simply the first rows
    assert picked[0] != picked[1]  # the seed picks them


def test_no_examples_sampled_is_a_clear_error(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), {"fr_a": [friction_row("1")]})
    with pytest.raises(click.ClickException, match="no examples sampled"):
        run_mix(make_params({"fr_a": "friction"}, {"fr_a": 0.0}))


def test_source_missing_from_manifest(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), {"fr_a": [friction_row("1")]})
    with pytest.raises(click.ClickException, match=r"manifest\.json has no source 'fr_b' with its rows; rerun fetch"):
        run_mix(make_params({"fr_a": "friction", "fr_b": "friction"}))


def test_fetched_file_missing_is_a_clear_error(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), {"fr_a": [friction_row("1")], "fr_b": [friction_row("2")]})
    Path("data/raw/fr_b.jsonl").unlink()
    with pytest.raises(click.ClickException, match=r"data/raw/fr_b\.jsonl: missing, .* rerun fetch"):
        run_mix(make_params({"fr_a": "friction", "fr_b": "friction"}))
    assert not Path("data/mixed").exists()


def outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_params_give_byte_identical_outputs(workspace: Path, make_params: Callable) -> None:
    sources = dirty_sources() | sampling_sources()
    write_raw(Path("data/raw"), sources)
    params = make_params(sources_format(sources), target_fraction=0.8)

    run_mix(params, "one/mixed", "one/metrics/mix.json")
    run_mix(params, "two/mixed", "two/metrics/mix.json")
    first = outputs(workspace / "one")
    assert sorted(first) == [
        "metrics/mix.json",
        "mixed/dropped.jsonl",
        "mixed/train.parquet",
        "mixed/validation.parquet",
    ]
    assert first == outputs(workspace / "two")

    run_mix(params.model_copy(update={"seed": params.seed + 1}), "three/mixed", "three/metrics/mix.json")
    third = outputs(workspace / "three")
    assert third["mixed/train.parquet"] != first["mixed/train.parquet"]  # the seed is used
    assert third["mixed/dropped.jsonl"] == first["mixed/dropped.jsonl"]


# --- tokens and labels --------------------------------------------------------------------------------------

MULTI_TURN = reluctance_text("Should I text him tonight?", "They sound tired.", "Maybe wait? 🙂 Café first.") + (
    "<|im_start|>user\nWhy?\n<|im_end|>\n"
    "<|im_start|>assistant\n<judging>\nhm\n</judging>\nBecause (mostly) sleep.\n<|im_end|>\n"
)
TEXTS = [
    friction_text(friction_row("1"), SYSTEM_PROMPT),
    source_rows.reluctance_text({"text": MULTI_TURN}),  # two assistant turns, non-ASCII text
    render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nok\n</think>\nHello."}]),
    source_rows.reluctance_text({"text": STANDARD_CHATML}),
]
TEXT_IDS = ["friction", "multi-turn", "no-system", "standard-chatml"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir, None)  # as mix loads it: <|im_end|> is the EOS id


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_labels_decode_to_exactly_the_assistant_turns(tokenizer, text: str) -> None:
    tokens = tokenize(text, tokenizer)
    assert tokens.input_ids == tokenizer(text)["input_ids"]
    assert tokens.input_ids[0] == tokenizer.bos_token_id
    assert len(tokens.labels) == len(tokens.input_ids)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(tokens.labels, tokens.input_ids))
    decoded = [tokenizer.decode(run) for run in labelled_runs(tokens.labels)]
    assert decoded == [text[start:end] for start, end in assistant_spans(text)]
    assert all(run[-1] == tokenizer.eos_token_id for run in labelled_runs(tokens.labels))
    # ...and the untrained rest is the prompt side: system and user turns, role headers, newlines between turns.
    untrained = tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label == IGNORE_INDEX])
    assert "<think>" not in untrained and "</think>" not in untrained


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_user_starts_point_at_each_user_header(tokenizer, text: str) -> None:
    tokens = tokenize(text, tokenizer)
    users = [turn.group(0) for turn in chatml.turns(text) if turn.group(1) == "user"]
    assert len(tokens.user_starts) == len(users)
    for start, turn in zip(tokens.user_starts, users):
        assert tokenizer.decode(tokens.input_ids[start:]).startswith(turn)
        assert not tokenizer.decode(tokens.input_ids[:start]).endswith(IM_START)


# --- over-length rows ---------------------------------------------------------------------------------------

MAX_LENGTH = 160


def over_length_sources() -> dict[str, list]:
    long_answer = "I hear you, and I'm not sure it is that simple. " * 20
    return {
        "fr_a": [friction_row(f"a{i}") for i in range(8)] + [friction_row("long", answer=long_answer)],  # line 9
        "re_b": [{"text": reluctance_text(f"Q{i}?")} for i in range(4)],
    }


def check_over_length_data(tokenizer) -> None:
    """The test data is what it claims: only fr_a line 9 is over MAX_LENGTH tokens."""
    sources = over_length_sources()
    texts = [friction_text(row, SYSTEM_PROMPT) for row in sources["fr_a"]]
    texts += [source_rows.reluctance_text(row) for row in sources["re_b"]]
    lengths = [len(tokenize(text, tokenizer).input_ids) for text in texts]
    assert [length > MAX_LENGTH for length in lengths] == [False] * 8 + [True] + [False] * 4, lengths


def test_over_length_rows_are_dirty_under_drop(workspace: Path, make_params: Callable, tokenizer) -> None:
    check_over_length_data(tokenizer)
    write_raw(Path("data/raw"), over_length_sources())
    params = make_params({"fr_a": "friction", "re_b": "reluctance"}, target_fraction=1.0)
    report = run_mix(with_overflow(params, MAX_LENGTH, "drop"))

    counts = report["sources"]["fr_a"]
    assert counts["dropped"] == {"over_max_length": 1}
    assert (counts["rows_in"], counts["kept"], counts["over_max_length"]) == (9, 8, 0)
    # Dropped before sampling: the target counts usable rows only, int(1.0 x 12) = 12, not 13.
    assert (report["available"], report["asked"]) == (12, 12)
    assert all(len(e["input_ids"]) <= MAX_LENGTH for e in read_mixed())
    [record] = read_jsonl(Path("data/mixed/dropped.jsonl"))
    assert record["source"] == "fr_a" and record["line"] == 9 and record["id"] == "long"
    assert record["reason"] == "over_max_length" and "over model.max_length 160" in record["detail"]


def test_over_length_rows_stop_the_stage_under_drop_and_fail(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), over_length_sources())
    params = make_params({"fr_a": "friction", "re_b": "reluctance"}, on_bad_rows="fail")

    expected = r"data/sources/fr_a\.jsonl line 9: over_max_length: \d+ tokens, over"
    with pytest.raises(click.ClickException, match=expected):
        run_mix(with_overflow(params, MAX_LENGTH, "drop"))
    assert not Path("data/mixed").exists() and not Path("metrics/mix.json").exists()
    # Under truncate or split the same row is no bad row: it is kept for pack to cut.
    assert run_mix(with_overflow(params, MAX_LENGTH, "truncate"))["sources"]["fr_a"]["dropped"] == {}


@pytest.mark.parametrize("overflow", ["truncate", "split"])
def test_over_length_rows_are_kept_and_counted_for_pack(workspace: Path, make_params: Callable, overflow: str) -> None:
    write_raw(Path("data/raw"), over_length_sources())
    # Weights of 1 each: every clean row is sampled.
    params = make_params({"fr_a": "friction", "re_b": "reluctance"}, {"fr_a": 1.0, "re_b": 1.0}, target_fraction=1.0)
    report = run_mix(with_overflow(params, MAX_LENGTH, overflow))

    counts = report["sources"]["fr_a"]
    assert (counts["dropped"], counts["kept"], counts["over_max_length"]) == ({}, 9, 1)
    assert report["sources"]["re_b"]["over_max_length"] == 0
    [long] = [e for e in read_mixed() if e["id"] == "long"]
    assert len(long["input_ids"]) > MAX_LENGTH  # whole: cutting is pack's job
    # The token report counts what pack will keep: under truncate, at most max_length of each row.
    cap = MAX_LENGTH if overflow == "truncate" else None
    lengths = [len(e["input_ids"]) for e in read_mixed() if e["source"] == "fr_a"]
    assert counts["tokens"] == sum(min(n, cap) if cap else n for n in lengths)


@pytest.mark.parametrize("overflow", ["truncate", "drop", "split"])
def test_a_row_far_over_max_length_is_never_tokenized_whole(
    workspace: Path, make_params: Callable, tokenizer, overflow: str
) -> None:
    huge = friction_row("huge", answer="I hear you, and I'm not sure it is that simple. " * 8000)  # ~400k characters
    write_raw(Path("data/raw"), {"fr_a": [friction_row(f"a{i}") for i in range(8)] + [huge]})  # line 9
    params = with_overflow(make_params({"fr_a": "friction"}, {"fr_a": 1.0}, target_fraction=1.0), MAX_LENGTH, overflow)
    text = friction_text(huge, SYSTEM_PROMPT)
    limit = certainly_over_chars(MAX_LENGTH, tokenizer)
    assert len(text) > 20 * limit  # the bound is generous, and this row far beyond it

    report = run_mix(params)
    counts = report["sources"]["fr_a"]
    dropped = read_jsonl(Path("data/mixed/dropped.jsonl"))
    if overflow == "truncate":  # kept for pack to cut, as any over-length row: only its head was tokenized
        assert (counts["dropped"], counts["kept"], counts["over_max_length"]) == ({}, 9, 1)
        [row] = [e for e in read_mixed() if e["id"] == "huge"]
        assert len(row["text"]) == limit and text.startswith(row["text"])
        whole = tokenize(text, tokenizer)  # what tokenizing it all gives: the same first max_length tokens and labels
        assert row["input_ids"][:MAX_LENGTH] == whole.input_ids[:MAX_LENGTH]
        assert row["labels"][:MAX_LENGTH] == whole.labels[:MAX_LENGTH]
        assert any(label != IGNORE_INDEX for label in row["labels"][:MAX_LENGTH])  # the answer's head is trained
        assert len(row["input_ids"]) < len(whole.input_ids) // 10
        return
    reason = "over_max_length" if overflow == "drop" else "far_over_max_length"
    assert (counts["dropped"], counts["kept"]) == ({reason: 1}, 8)
    [record] = dropped
    assert (record["line"], record["id"], record["reason"]) == (9, "huge", reason)
    assert f"{len(text)} characters, over model.max_length {MAX_LENGTH} tokens for certain" in record["detail"]


# --- weighting ----------------------------------------------------------------------------------------------


def stub_rows(source: str, lengths: list[int]) -> list[Encoded]:
    """Encoded rows of the given token counts (ids are never looked at by sampling)."""
    return [Encoded(f"{source}{i}", source, i + 1, Stored(0, n, 0, 0), n) for i, n in enumerate(lengths)]


def sample_report(make_params: Callable, rows: dict[str, list[Encoded]], weights: dict, **mix_params) -> dict:
    params = make_params(dict.fromkeys(rows, "friction"), weights, **mix_params)
    return mixing.sample(rows, params)[1]


def test_tokens_weighting_budget_hand_worked(make_params: Callable) -> None:
    rows = {"a": stub_rows("a", [100] * 10), "b": stub_rows("b", [300] * 10)}
    # asked = min(10, int(1.0 x 20)) = 10 rows; mean row = 4000 / 20 = 200 tokens; budget = 10 x 200 = 2000 tokens.
    tokens = sample_report(
        make_params, rows, {"a": 0.5, "b": 0.5}, target_max=10, target_fraction=1.0, weighting="tokens"
    )
    assert (tokens["asked"], tokens["tokens_asked"]) == (10, 2000)
    # a: share 1000 tokens = all ten 100-token rows (exactly at the share: not capped); b: 1000 // 300 = 3 rows.
    picked = {n: (c["tokens_asked"], c["sampled"], c["tokens"], c["capped"]) for n, c in tokens["sources"].items()}
    assert picked == {"a": (1000, 10, 1000, False), "b": (1000, 3, 900, False)}
    assert (tokens["sampled"], tokens["tokens"]) == (13, 1900)
    assert tokens["sources"]["a"]["token_share"] == round(1000 / 1900, 4)

    # The same weights as shares of examples: five rows each, so b gets three quarters of the tokens.
    examples = sample_report(make_params, rows, {"a": 0.5, "b": 0.5}, target_max=10, target_fraction=1.0)
    picked = {name: (c["asked"], c["sampled"], c["tokens"], c["capped"]) for name, c in examples["sources"].items()}
    assert picked == {"a": (5, 5, 500, False), "b": (5, 5, 1500, False)}
    assert examples["sources"]["b"]["token_share"] == 0.75
    assert examples["tokens_asked"] == 2000 and examples["sources"]["b"]["tokens_asked"] == 1000  # reported only


def test_tokens_weighting_caps_a_source_that_runs_out(make_params: Callable) -> None:
    rows = {"a": stub_rows("a", [100] * 4), "b": stub_rows("b", [100] * 16)}
    # asked = int(0.5 x 20) = 10; budget = 10 x 2000 // 20 = 1000; a's share 0.6 x 1000 = 600 > its 400 tokens.
    report = sample_report(make_params, rows, {"a": 0.6, "b": 0.4}, target_fraction=0.5, weighting="tokens")
    a, b = report["sources"]["a"], report["sources"]["b"]
    assert (a["tokens_asked"], a["sampled"], a["tokens"], a["capped"]) == (600, 4, 400, True)
    assert (b["tokens_asked"], b["sampled"], b["tokens"], b["capped"]) == (400, 4, 400, False)  # not topped up
    assert report["tokens"] == 800


def test_tokens_weighting_stops_at_the_first_row_that_would_pass_the_share() -> None:
    rows = stub_rows("a", [300, 500, 100, 100])
    assert mixing.rows_within(rows, 700) == 1  # 300 + 500 > 700: the shorter rows after it are not taken instead
    assert mixing.rows_within(rows, 800) == 2
    assert mixing.rows_within(rows, 999) == 3
    assert mixing.rows_within(rows, 1000) == 4
    assert mixing.rows_within(rows, 299) == 0


def test_tokens_weighting_end_to_end(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), sampling_sources())
    params = make_params({"fr_a": "friction", "re_b": "reluctance"}, {"fr_a": 0.3, "re_b": 0.7}, weighting="tokens")
    report = run_mix(params)
    examples = read_mixed()
    assert report["weighting"] == "tokens"
    assert report["tokens_asked"] == report["asked"] * report["available_tokens"] // report["available"]
    for name in ("fr_a", "re_b"):
        counts = report["sources"][name]
        picked = [e for e in examples if e["source"] == name]
        assert counts["tokens"] == sum(len(e["input_ids"]) for e in picked) <= counts["tokens_asked"]
        assert counts["sampled"] == len(picked)
    assert report["sources"]["re_b"]["capped"] and report["sources"]["re_b"]["sampled"] == 4


def test_examples_weighting_picks_exactly_what_the_original_code_picks(workspace: Path, make_params: Callable) -> None:
    """Counts worked by hand, and the examples and their order in each split equal the original's sampling redone
    on whole datasets tables (original-recipe.md section 4)."""
    sources = dirty_sources() | sampling_sources()  # fr_a, re_b of the sampling sources; fr_b, re_a the dirty ones
    write_raw(Path("data/raw"), sources)
    weights = {"fr_a": 0.35, "fr_b": 0.25, "re_a": 0.2, "re_b": 0.2}
    params = make_params(sources_format(sources), weights, target_fraction=0.9, target_max=15)
    report = run_mix(params)

    # Clean rows: fr_a 20, fr_b 1 (its a17 duplicates fr_a's), re_a 1, re_b 4 = 26; asked = min(15, int(23.4)) = 15.
    # int(15 x .35) = 5, int(15 x .25) = 3 -> 1 (capped), int(15 x .2) = 3 -> 1 (capped), 3.
    assert (report["available"], report["asked"], report["sampled"]) == (26, 15, 10)
    expected = {"fr_a": (5, 5, False), "fr_b": (3, 1, True), "re_a": (3, 1, True), "re_b": (3, 3, False)}
    assert {n: (c["asked"], c["sampled"], c["capped"]) for n, c in report["sources"].items()} == expected

    rows = itertools.chain.from_iterable(
        source_rows.read_source(Path(f"data/raw/{name}.jsonl"), name, source.format, SYSTEM_PROMPT, [])
        for name, source in params.data.sources.items()
    )
    clean = list(source_rows.unique(rows, []))
    parts = []
    for name in params.data.sources:
        rows = [{"id": e.id, "source": e.source} for e in clean if e.source == name]
        parts.append(Dataset.from_list(rows).shuffle(seed=params.seed).select(range(expected[name][1])))
    mixed = concatenate_datasets(parts).shuffle(seed=params.seed).flatten_indices()
    split = mixed.train_test_split(test_size=params.mix.validation_fraction, seed=params.seed)
    for ours, theirs in (("train", "train"), ("validation", "test")):
        got = [(e["source"], e["id"]) for e in pq.read_table(f"data/mixed/{ours}.parquet").to_pylist()]
        assert got == [(e["source"], e["id"]) for e in split[theirs]], ours


# --- the report ---------------------------------------------------------------------------------------------


def test_weights_not_summing_to_one_are_reported_and_warned(
    workspace: Path, make_params: Callable, capsys: pytest.CaptureFixture
) -> None:
    write_raw(Path("data/raw"), sampling_sources())
    report = run_mix(make_params({"fr_a": "friction", "re_b": "reluctance"}, {"fr_a": 0.5, "re_b": 0.25}))
    assert (report["weights_sum"], report["weights_sum_is_one"]) == (0.75, False)
    assert "mix: warning: mix.weights sum to 0.75, not 1" in capsys.readouterr().out

    report = run_mix(make_params({"fr_a": "friction", "re_b": "reluctance"}, {"fr_a": 0.7, "re_b": 0.3}))
    assert (report["weights_sum"], report["weights_sum_is_one"]) == (1.0, True)  # 0.7 + 0.3 is 0.99999...
    assert "warning" not in capsys.readouterr().out


def test_a_source_without_clean_rows_and_no_weight_is_reported_and_warned(
    workspace: Path, make_params: Callable, capsys: pytest.CaptureFixture
) -> None:
    sources = {"fr_a": [friction_row(f"a{i}") for i in range(10)], "fr_b": [friction_row("b", answer="Error: x")]}
    write_raw(Path("data/raw"), sources)
    report = run_mix(make_params(sources_format(sources), {"fr_a": 1.0, "fr_b": 0.0}))

    empty = report["sources"]["fr_b"]
    assert (empty["available"], empty["empty"], empty["capped"], empty["sampled"], empty["tokens"]) == (
        0,
        True,
        False,
        0,
        0,
    )
    assert report["empty_sources"] == 1
    assert report["sources"]["fr_a"]["empty"] is False
    out = capsys.readouterr().out
    assert "mix: warning: source fr_b has no clean rows" in out
    assert "mix: fr_b: 1 rows in, 0 kept, 0 sampled" in out


def test_report_is_dvc_metrics_without_lists(workspace: Path, make_params: Callable) -> None:
    sources = dirty_sources() | sampling_sources()
    write_raw(Path("data/raw"), sources)
    report = run_mix(make_params(sources_format(sources), weighting="tokens"))

    def leaves(node: object) -> list[object]:
        return [leaf for value in node.values() for leaf in leaves(value)] if isinstance(node, dict) else [node]

    assert all(isinstance(leaf, (int, float, str)) for leaf in leaves(report))  # bools are ints
    for name, counts in report["sources"].items():
        keys = {
            "rows_in",
            "kept",
            "dropped",
            "over_max_length",
            "available",
            "available_tokens",
            "asked",
            "sampled",
            "tokens_asked",
            "tokens",
            "token_share",
            "capped",
            "empty",
        }
        assert set(counts) == keys, name
    assert report["tokens"] == sum(c["tokens"] for c in report["sources"].values())
