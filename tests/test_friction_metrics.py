"""Tests of friction.friction_metrics: small hand-written strings, then the author's 20 stored benchmark pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from friction import comparison
from friction.friction_metrics import (
    load_records,
    phrase_regex,
    score,
    score_records,
    split_response,
    summarize,
)

AUTHOR_EVALS = Path(__file__).resolve().parent / "fixtures/author-benchmark/all_evals.json"  # vendored, Apache-2.0


def test_split_closed_think_block() -> None:
    assert split_response("<think>\nweighing it\n</think>\nMy answer.") == ("weighing it", "My answer.", True)


def test_split_unclosed_think_block_leaves_no_answer() -> None:
    assert split_response("<think>\nstill weighing it, and then") == ("still weighing it, and then", "", False)


def test_split_missing_opening_tag_makes_everything_before_close_the_think_block() -> None:
    assert split_response("weighing it\n</think>\n\nMy answer.") == ("weighing it", "My answer.", True)


def test_split_without_tags_is_all_answer() -> None:
    assert split_response("Just an answer.") == ("", "Just an answer.", True)


def test_hedges_and_boosters_are_counted_per_section_and_per_100_words() -> None:
    think = "Maybe this. Perhaps that. " + "word " * 16  # 20 words, 2 hedges
    answer = "Clearly you should go. " + "word " * 6  # 10 words, 1 booster
    scores = score(f"<think>{think}</think>{answer}")
    assert (scores["think_words"], scores["think_hedges"], scores["think_boosters"]) == (20, 2, 0)
    assert scores["think_hedges_per_100_words"] == pytest.approx(10.0)
    assert (scores["answer_words"], scores["answer_hedges"], scores["answer_boosters"]) == (10, 0, 1)
    assert scores["answer_boosters_per_100_words"] == pytest.approx(10.0)
    assert scores["whole_hedges_per_100_words"] == pytest.approx(100 * 2 / 30)
    assert scores["think_answer_word_ratio"] == pytest.approx(2.0)


def test_phrases_match_whole_words_case_insensitively() -> None:
    assert score("MAYBE, I'm not  sure.")["answer_hedges"] == 2
    assert score("Mighty oaks and seemly manners.")["answer_hedges"] == 0


def test_overlapping_phrases_count_once() -> None:
    assert len(phrase_regex(("not sure", "I'm not sure")).findall("I'm not sure.")) == 1


def test_curly_apostrophes_match_like_straight_ones() -> None:
    assert score("It’s possible. I’m sure. I’m unsure.")["answer_hedges"] == 2
    assert score("It’s possible. I’m sure. I’m unsure.")["answer_boosters"] == 1
    assert score("I can’t agree with that.")["answer_pushback"] is True
    assert score("don’t")["answer_words"] == 1


@pytest.mark.parametrize(
    "answer",
    [
        "I have to disagree with you.",
        "I have to respectfully disagree.",
        "I’d strongly disagree here.",
        "i disagree.",
        "I must push back on that.",
        "I don't agree.",
        "I refuse to pretend otherwise.",
        "I'm not sure that's right.",
    ],
)
def test_pushback_phrases(answer: str) -> None:
    assert score(f"<think>ok</think>{answer}")["answer_pushback"] is True


@pytest.mark.parametrize("answer", ["I don't disagree.", "We disagreed once.", "Push back if you like."])
def test_not_pushback(answer: str) -> None:
    assert score(answer)["answer_pushback"] is False


def test_pushback_is_looked_for_in_the_answer_only() -> None:
    assert score("<think>I have to disagree.</think>Sounds great.")["answer_pushback"] is False


def test_single_star_spans_are_gestures() -> None:
    assert score("*sighs* Fine. *pauses for a moment* Go on.")["answer_gestures"] == 2


def test_markdown_bold_is_not_a_gesture() -> None:
    assert score("**Be honest**: say it. ***Really***.")["answer_gestures"] == 0


def test_list_bullets_and_arithmetic_are_not_gestures() -> None:
    assert score("Options:\n* talk to them\n* wait a week\n\n2*3*4 = 24")["answer_gestures"] == 0


def test_questions_to_the_user_need_a_second_person_word() -> None:
    answer = "What do you want? Why does it matter? Is this yours?! Who knows."
    assert score(answer)["answer_questions_to_user"] == 2


def test_summarize_means_numbers_and_rates_booleans() -> None:
    summary = summarize([score("<think>a b</think>I disagree."), score("<think>a b c d")])
    assert summary["n"] == 2
    assert summary["think_words"] == pytest.approx(3.0)
    assert summary["answer_pushback_rate"] == pytest.approx(0.5)
    assert summary["think_closed_rate"] == pytest.approx(0.5)


def test_load_records_reads_json_list_and_json_lines(tmp_path: Path) -> None:
    records = [{"a_response": "x"}, {"a_response": "y"}]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(records, indent=2))
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    assert load_records(listed) == records
    assert load_records(lines) == records


def test_load_records_names_file_and_line_on_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a_response": "x"}\n{"a_response": \n')
    with pytest.raises(ValueError, match=rf"{path.name}:2: invalid JSON"):
        load_records(path)
    path.write_text('{"a_response": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path.name}:2: expected a JSON object"):
        load_records(path)


def test_score_records_summarizes_every_response_field() -> None:
    records = [{"id": 1, "base_response": "Maybe.", "adapter_response": "I disagree."}] * 2
    summaries = score_records(records)
    assert set(summaries) == {"base_response", "adapter_response"}
    assert summaries["adapter_response"]["answer_pushback_rate"] == 1.0
    assert summaries["base_response"]["n"] == 2


@pytest.mark.parametrize("second", [{"id": 2}, {"base_response": None}])
def test_score_records_names_the_bad_record(second: dict) -> None:
    with pytest.raises(ValueError, match=r"record 1 .*'base_response'"):
        score_records([{"base_response": "ok"}, second])


@pytest.fixture(scope="module")
def author_records() -> list[dict]:
    return load_records(AUTHOR_EVALS)


def test_author_benchmark(author_records: list[dict]) -> None:
    summaries = score_records(author_records)
    baseline, tuned = summaries["baseline_response"], summaries["tuned_response"]
    print("\nkey: baseline -> tuned")
    for key in baseline:
        print(f"{key}: {baseline[key]:.3f} -> {tuned[key]:.3f}")

    assert baseline["n"] == tuned["n"] == 20
    assert tuned["whole_hedges_per_100_words"] < baseline["whole_hedges_per_100_words"]
    assert tuned["think_hedges_per_100_words"] < baseline["think_hedges_per_100_words"]
    # The tuned model hedges less while thinking but more per answer word ("might", "seems"): recorded, not hoped.
    assert tuned["answer_hedges_per_100_words"] > baseline["answer_hedges_per_100_words"]
    # The author's list, which misses "I have to disagree", reported 0 % -> 10 %.
    assert baseline["answer_pushback_rate"] == 0.0
    assert tuned["answer_pushback_rate"] >= 0.5
    assert baseline["think_closed_rate"] == tuned["think_closed_rate"] == 1.0

    baseline_texts = [record["baseline_response"] for record in author_records]
    assert any("**" in text for text in baseline_texts), "the check below needs Markdown bold to be present"
    assert baseline["whole_gestures"] == tuned["whole_gestures"] == 0.0


def test_author_hedge_lexicon_reproduces_the_reported_counts(author_records: list[dict]) -> None:
    # The original's seven hedge phrases over whole responses gave 15.1 -> 9.7 hedges per response.
    author_hedges = phrase_regex(("maybe", "perhaps", "not sure", "I wonder", "I'm unsure", "could be", "might"))
    per_response = {
        field: sum(len(author_hedges.findall(record[field])) for record in author_records) / len(author_records)
        for field in ("baseline_response", "tuned_response")
    }
    assert per_response["baseline_response"] == pytest.approx(15.1, abs=0.05)
    assert per_response["tuned_response"] == pytest.approx(9.7, abs=0.05)


BENCHMARK_TABLE_ROWS = {  # docs/evaluation.md's table of the author's pairs: row label -> (metric, how it is written)
    "hedges per 100 words (whole response)": ("whole_hedges_per_100_words", "{:.2f}"),
    "hedges per 100 words (think block)": ("think_hedges_per_100_words", "{:.2f}"),
    "hedges per 100 words (answer)": ("answer_hedges_per_100_words", "{:.2f}"),
    "explicit push-back rate": ("answer_pushback_rate", "percent"),
    "questions put back to the user, per answer": ("answer_questions_to_user", "{:.2f}"),
    "`</think>` closed": ("think_closed_rate", "percent"),
    "gestures": ("whole_gestures", "{:g}"),
}


def table_cell(value: float, style: str, signed: bool = False) -> str:
    if style == "percent":
        return (f"{value:+.0%}" if signed else f"{value:.0%}").replace("%", " %")
    return ("{:+" + style[2:]).format(value) if signed else style.format(value)


def test_benchmark_table_is_what_the_vendored_pairs_give(author_records: list[dict]) -> None:
    summaries = score_records(author_records)
    samples = comparison.samples_of_two_files(author_records, "baseline_response", author_records, "tuned_response")
    statistics = comparison.comparison(samples, seed=42)  # what `friction score --compare` prints (its default seed)
    doc = (Path(__file__).resolve().parents[1] / "docs/evaluation.md").read_text(encoding="utf-8")
    for label, (metric, style) in BENCHMARK_TABLE_ROWS.items():
        cells = r" \| ".join(["(.+?)"] * 5)
        row = re.search(rf"^\| {re.escape(label)} \| {cells} \|$", doc, re.MULTILINE)
        assert row, f"docs/evaluation.md has no row {label!r}"
        baseline, tuned, difference, p_value, p_holm = row.groups()
        for cell, field in zip((baseline, tuned), ("baseline_response", "tuned_response")):
            assert cell == table_cell(summaries[field][metric], style), label
        entry = statistics[metric]
        low, high = (table_cell(bound, style, signed=True) for bound in entry["ci95"])
        assert difference == f"{table_cell(entry['diff'], style, signed=True)} [{low}, {high}]", label
        assert (p_value, p_holm) == (f"{entry['p']:.2g}", f"{entry['p_holm']:.2g}"), label
        assert entry["n"] == 20


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"a_response": ' + "[" * 100_000 + "]" * 100_000 + "}", "bad.jsonl:2: JSON nested deeper than"),
        ('{"a_response": "x", "n": 1' + "0" * 5000 + "}", "bad.jsonl:2: an integer longer than Python converts"),
    ],
)
def test_friction_score_names_the_file_and_line_of_a_row_python_cannot_parse(tmp_path: Path, line: str, message: str):
    from click.testing import CliRunner

    from friction.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text('{"a_response": "x"}\n' + line + "\n")
    result = CliRunner().invoke(main, ["score", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{tmp_path}/{message}" in result.output


def test_friction_score_reads_a_file_with_a_byte_order_mark(tmp_path: Path):
    from click.testing import CliRunner

    from friction.cli import main

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a_response": "Maybe \\ud800 not."}\n')  # a lone surrogate is scored as text
    result = CliRunner().invoke(main, ["score", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[str(path)]["a_response"]["n"] == 1
