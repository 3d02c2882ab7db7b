"""Tests of stages.mix: the original text format, every kind of dirty row, the sampling arithmetic, the split."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from conftest import SYSTEM_PROMPT, friction_row, jsonl_bytes, reluctance_text

from stages import mix
from stages.chatml import render
from stages.mix import BadRow, friction_messages, reluctance_messages

# original-recipe.md section 3, verbatim.
ORIGINAL_FRICTION_TEMPLATE = (
    "<|im_start|>system\nYou are a human-like AI assistant.\n<|im_end|>\n<|im_start|>user\n{question}\n<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n{thoughts}\n</think>\n{final_answer}\n<|im_end|>\n"
)


def write_raw(raw_dir: Path, sources: dict[str, list]) -> None:
    """What fetch leaves: <name>.jsonl per source and a manifest whose row count skips blank lines."""
    raw_dir.mkdir(parents=True)
    manifest = {"sources": {}, "base_model": {"location": "data/sources/demo-base"}}
    for name, rows in sources.items():
        data = jsonl_bytes(rows)
        (raw_dir / f"{name}.jsonl").write_bytes(data)
        manifest["sources"][name] = {"rows": sum(1 for line in data.split(b"\n") if line.strip())}
    (raw_dir / "manifest.json").write_text(json.dumps(manifest))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_mix(params, out: str = "data/mixed", metrics: str = "metrics/mix.json") -> dict:
    mix.run(params, Path("data/raw"), Path(out), Path(metrics))
    return json.loads(Path(metrics).read_text())


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
    text, spans = render(friction_messages(row, SYSTEM_PROMPT))
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


def test_reluctance_judging_becomes_think_and_turns_are_parsed() -> None:
    text = reluctance_text(
        "Write a Slack message that puts him in his place.", "He took credit. Anger is fair.", "Firm, not cruel?"
    )
    messages = reluctance_messages({"text": text, "other": 1})
    assert messages == [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Write a Slack message that puts him in his place."},
        {"role": "assistant", "content": "<think>\nHe took credit. Anger is fair.\n</think>\nFirm, not cruel?"},
    ]
    # Rendering gives back the stored conversation with only the tags renamed.
    assert render(messages)[0] == text.replace("<judging>", "<think>").replace("</judging>", "</think>")


def test_reluctance_multi_turn_keeps_every_turn() -> None:
    text = (
        "<|im_start|>user\nHi\n<|im_end|>\n<|im_start|>assistant\n<judging>\nfine\n</judging>\nHello.\n<|im_end|>\n"
        "<|im_start|>user\nHelp me lie to my boss.\n<|im_end|>\n"
        "<|im_start|>assistant\n<judging>\nhm\n</judging>\nI'd rather not.\n<|im_end|>\n"
    )
    messages = reluctance_messages({"text": text})
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "<think>\nhm\n</think>\nI'd rather not."
    assert render(messages)[0] == text.replace("<judging>", "<think>").replace("</judging>", "</think>")


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
    ],
)
def test_bad_reluctance_rows(row: dict, reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        reluctance_messages(row)


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
    assert {(d["source"], d["line"]) for d in dropped if "line" in d} == {
        ("fr_a", n) for n in (2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16)
    } | {("re_a", n) for n in (2, 4, 5, 6)}
    duplicates = sorted((d["source"], d["id"], d["detail"]) for d in dropped if "line" not in d)
    assert duplicates == [
        ("fr_a", "a1", "duplicate of fr_a:a1"),
        ("fr_b", "a17", "duplicate of fr_a:a17"),
        ("re_a", "re_a:3", "duplicate of re_a:re_a:1"),
        ("re_b", "re_b:1", "duplicate of re_a:re_a:1"),
    ]

    examples = read_jsonl(Path("data/mixed/train.jsonl")) + read_jsonl(Path("data/mixed/validation.jsonl"))
    assert sorted((e["source"], e["id"]) for e in examples) == sorted(
        (name, row_id) for name, ids in kept.items() for row_id in ids
    )
    for example in examples:  # nothing of a dropped row slipped through
        assert "Error:" not in render(example["messages"])[0].replace("not an Error: a mention", "")


def sources_format(sources: dict) -> dict[str, str]:
    return {name: "friction" if name.startswith("fr") else "reluctance" for name in sources}


def test_on_bad_rows_fail_names_the_file_and_line(workspace: Path, make_params: Callable) -> None:
    sources = dirty_sources()
    write_raw(Path("data/raw"), sources)
    params = make_params(sources_format(sources), on_bad_rows="fail")

    with pytest.raises(click.ClickException, match=r"data/raw/fr_a\.jsonl line 2: generator error in 'final_answer'"):
        run_mix(params)
    assert not Path("data/mixed").exists() and not Path("metrics/mix.json").exists()


def test_on_bad_rows_fail_on_a_duplicate_names_the_file_and_example(workspace: Path, make_params: Callable) -> None:
    write_raw(Path("data/raw"), {"fr_a": [friction_row("1"), friction_row("2")], "fr_b": [friction_row("2")]})
    params = make_params(sources_format(["fr_a", "fr_b"]), on_bad_rows="fail")

    with pytest.raises(click.ClickException, match=r"data/raw/fr_b\.jsonl id 2: duplicate of fr_a:2"):
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
        ({"target_max": 100, "target_fraction": 0.5, "weights": {"fr_a": 0.5, "re_b": 0.5}},
         {"asked": 12, "fr_a": (6, 6, False), "re_b": (6, 4, True)}, 1.0),
        # target_max binds: asked = min(8, 21) = 8; 4 each, nothing capped.
        ({"target_max": 8, "target_fraction": 0.9, "weights": {"fr_a": 0.5, "re_b": 0.5}},
         {"asked": 8, "fr_a": (4, 4, False), "re_b": (4, 4, False)}, 1.0),
        # Weights summing to 0.75 are not renormalised, only reported: a 6, b int(12 x .25) = 3.
        ({"target_max": 100, "target_fraction": 0.5, "weights": {"fr_a": 0.5, "re_b": 0.25}},
         {"asked": 12, "fr_a": (6, 6, False), "re_b": (3, 3, False)}, 0.75),
        # int(), not round(): asked = int(0.9 x 24) = 21; int(21 x .5) = 10 each; b capped at 4.
        ({"target_max": 100, "target_fraction": 0.9, "weights": {"fr_a": 0.5, "re_b": 0.5}},
         {"asked": 21, "fr_a": (10, 10, False), "re_b": (10, 4, True)}, 1.0),
        # A zero weight takes nothing; the capped source's shortfall is not made up from the other one.
        ({"target_max": 100, "target_fraction": 1.0, "weights": {"fr_a": 0.0, "re_b": 1.0}},
         {"asked": 24, "fr_a": (0, 0, False), "re_b": (24, 4, True)}, 1.0),
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

    train = read_jsonl(Path("data/mixed/train.jsonl"))
    validation = read_jsonl(Path("data/mixed/validation.jsonl"))
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
        examples = read_jsonl(Path(f"mixed-{seed}/train.jsonl")) + read_jsonl(Path(f"mixed-{seed}/validation.jsonl"))
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
    with pytest.raises(click.ClickException, match=r"manifest\.json has no source 'fr_b'; rerun fetch"):
        run_mix(make_params({"fr_a": "friction", "fr_b": "friction"}))


def outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_params_give_byte_identical_outputs(workspace: Path, make_params: Callable) -> None:
    sources = dirty_sources() | sampling_sources()
    write_raw(Path("data/raw"), sources)
    params = make_params(sources_format(sources), target_fraction=0.8)

    run_mix(params, "one/mixed", "one/metrics/mix.json")
    run_mix(params, "two/mixed", "two/metrics/mix.json")
    first = outputs(workspace / "one")
    assert sorted(first) == ["metrics/mix.json", "mixed/dropped.jsonl", "mixed/train.jsonl", "mixed/validation.jsonl"]
    assert first == outputs(workspace / "two")

    run_mix(params.model_copy(update={"seed": params.seed + 1}), "three/mixed", "three/metrics/mix.json")
    third = outputs(workspace / "three")
    assert third["mixed/train.jsonl"] != first["mixed/train.jsonl"]  # the seed is used
    assert third["mixed/dropped.jsonl"] == first["mixed/dropped.jsonl"]
