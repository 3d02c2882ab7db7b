"""Lexical "friction" metrics for model responses: hedging, boosting, push-back, questions, gestures, overthinking.

A response is split into its think block and its answer (`split_response`), and each part is scored on its own,
because a model that hedges while reasoning and then answers firmly is what the recipe aims for. The original
author's heuristics had two bugs that these definitions fix: the push-back list missed "I have to disagree", and the
`*…*` "gesture" regex counted Markdown bold.

Splitting
    A think block is open only if ``<think>`` appears; it runs to the first ``</think>`` after it, or, when that
    never comes (the model ran out of tokens), to the end of the text, leaving the answer empty. A ``</think>``
    without an opening tag closes a think block holding everything before it (DeepSeek-R1 distills omit the opening
    tag when the prompt template already opened it). Text with neither tag is all answer. Text before ``<think>``
    belongs to the answer.

Matching
    Lexicon phrases match whole words, case-insensitively, with straight (') or curly (’) apostrophes and any run of
    whitespace between words. Overlapping phrases count once, the longest winning.
    A word is a run of letters/digits, with inner apostrophes ("don't" is one word).

Hedges (`HEDGES`)
    maybe, perhaps, possibly, probably, might, could be, not sure, unsure (covers "I'm unsure"), not certain,
    I wonder, I think, I guess, I suppose, seem, seems, seemed, seemingly, it's possible.

Boosters (`BOOSTERS`)
    definitely, certainly, clearly, obviously, of course, without a doubt, no doubt, undoubtedly, surely, absolutely,
    always, never, in fact, I'm sure, I'm certain, it's clear.

Explicit push-back (`PUSHBACK`), answer only
    "I disagree" and "I push back", optionally with I'd / I would / I'll / I will, then have to / must / need to /
    want to / 've got to / am going to, then one -ly adverb ("I have to disagree", "I have to respectfully disagree",
    "I'd strongly disagree", "I'm going to push back"); "I can't / cannot / don't /
    do not agree"; "I refuse"; "I'm not convinced"; "I'm not sure that's right / true"; "I don't think that's right /
    true / fair / the case". Negated forms ("I don't disagree") do not count.

Questions to the user, answer only
    Sentences ending in "?" that contain a second-person word (you, your, yours, yourself, yourselves). Questions
    aimed at the user without one ("Why not talk to them?") are missed, so this is a lower bound.

Gestures
    Single-star emphasis spans such as ``*sighs*`` or ``*pauses for a moment*``: a star, no whitespace after it,
    text on one line, no whitespace before the closing star, and no star or word character touching either side.
    So Markdown bold (``**like this**``), list bullets (``* item``) and arithmetic (``2*3*4``) are not gestures;
    single-star Markdown italics are, since the two cannot be told apart.

Score keys (`score`)
    For each of the prefixes ``think_``, ``answer_`` and ``whole_`` (think block and answer together): ``words``,
    ``hedges``, ``hedges_per_100_words``, ``boosters``, ``boosters_per_100_words``, ``gestures``. Then
    ``answer_pushback`` (bool), ``answer_questions_to_user`` (count), ``think_closed`` (bool: False only for a think
    block opened and never closed) and ``think_answer_word_ratio`` (think words / max(answer words, 1)).

Summary keys (`summarize`)
    ``n``; the mean of every numeric score under the same key; the fraction true of every boolean score under the
    key with ``_rate`` appended (``answer_pushback_rate``, ``think_closed_rate``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import fmean

from friction.chatml import THINK_CLOSE, THINK_OPEN

_APOSTROPHE = "['’]"

HEDGES = (
    "maybe",
    "perhaps",
    "possibly",
    "probably",
    "might",
    "could be",
    "not sure",
    "unsure",
    "not certain",
    "I wonder",
    "I think",
    "I guess",
    "I suppose",
    "seem",
    "seems",
    "seemed",
    "seemingly",
    "it's possible",
)
BOOSTERS = (
    "definitely",
    "certainly",
    "clearly",
    "obviously",
    "of course",
    "without a doubt",
    "no doubt",
    "undoubtedly",
    "surely",
    "absolutely",
    "always",
    "never",
    "in fact",
    "I'm sure",
    "I'm certain",
    "it's clear",
)

_I_AM = rf"I(?:{_APOSTROPHE}m|\s+am)"
# Modal and adverb slots let "I have to respectfully disagree" match without listing every combination.
_I_MODAL_ADVERB = (
    rf"I(?:{_APOSTROPHE}d|\s+would|{_APOSTROPHE}ll|\s+will)?"
    rf"(?:\s+have\s+to|\s+must|\s+need\s+to|\s+want\s+to|{_APOSTROPHE}ve\s+got\s+to"
    rf"|\s+am\s+going\s+to|{_APOSTROPHE}m\s+going\s+to)?(?:\s+\w+ly)?"
)
PUSHBACK = (
    rf"{_I_MODAL_ADVERB}\s+disagree",
    rf"{_I_MODAL_ADVERB}\s+push\s+back",
    rf"I\s+(?:can{_APOSTROPHE}t|cannot|can\s+not|don{_APOSTROPHE}t|do\s+not)\s+agree",
    r"I\s+refuse",
    rf"{_I_AM}\s+not\s+convinced",
    rf"{_I_AM}\s+not\s+sure\s+(?:that{_APOSTROPHE}s|that\s+is)\s+(?:right|true)",
    rf"I\s+(?:don{_APOSTROPHE}t|do\s+not)\s+think\s+(?:that{_APOSTROPHE}s|that\s+is)\s+(?:right|true|fair|the\s+case)",
)

_WORD = re.compile(rf"\w+(?:{_APOSTROPHE}\w+)*")
_GESTURE = re.compile(r"(?<![*\w])\*(?=[^\s*])[^*\n]+?(?<=[^\s*])\*(?![*\w])")
_QUESTION = re.compile(r"[^.!?\n]*\?")
_SECOND_PERSON = re.compile(r"\byou(?:rs?|rself|rselves)?\b", re.IGNORECASE)
_PUSHBACK = re.compile(rf"\b(?:{'|'.join(PUSHBACK)})\b", re.IGNORECASE)


def phrase_regex(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """A case-insensitive regex matching any of `phrases` as whole words, as the lexicons are matched."""
    # Longest first, so an alternation prefers "I'm not sure" over "not sure" and counts the phrase once.
    alternatives = (
        re.escape(phrase).replace(r"\ ", r"\s+").replace("'", _APOSTROPHE)
        for phrase in sorted(phrases, key=len, reverse=True)
    )
    return re.compile(rf"\b(?:{'|'.join(alternatives)})\b", re.IGNORECASE)


_HEDGE = phrase_regex(HEDGES)
_BOOSTER = phrase_regex(BOOSTERS)


def split_response(text: str) -> tuple[str, str, bool]:
    """Split a response into (think block, answer, closed); see the module docstring for the rules."""
    before, opened, rest = text.partition(THINK_OPEN)
    if not opened:
        before, rest = "", text
    think, closed, after = rest.partition(THINK_CLOSE)
    if not closed:
        return (think.strip(), before.strip(), False) if opened else ("", text.strip(), True)
    answer = "\n\n".join(part for part in (before.strip(), after.strip()) if part)
    return think.strip(), answer, True


def _per_100(count: int, words: int) -> float:
    return 100 * count / words if words else 0.0


def _section_scores(prefix: str, text: str) -> dict[str, float | int | bool]:
    words = len(_WORD.findall(text))
    hedges = len(_HEDGE.findall(text))
    boosters = len(_BOOSTER.findall(text))
    return {
        f"{prefix}words": words,
        f"{prefix}hedges": hedges,
        f"{prefix}hedges_per_100_words": _per_100(hedges, words),
        f"{prefix}boosters": boosters,
        f"{prefix}boosters_per_100_words": _per_100(boosters, words),
        f"{prefix}gestures": len(_GESTURE.findall(text)),
    }


def score(text: str) -> dict[str, float | int | bool]:
    """Friction scores of one response; the keys are listed in the module docstring."""
    think, answer, closed = split_response(text)
    scores = (
        _section_scores("think_", think)
        | _section_scores("answer_", answer)
        | _section_scores("whole_", f"{think}\n{answer}")
    )
    scores["answer_pushback"] = _PUSHBACK.search(answer) is not None
    scores["answer_questions_to_user"] = sum(
        1 for question in _QUESTION.findall(answer) if _SECOND_PERSON.search(question)
    )
    scores["think_closed"] = closed
    scores["think_answer_word_ratio"] = scores["think_words"] / max(scores["answer_words"], 1)
    return scores


def summarize(scores: list[dict[str, float | int | bool]]) -> dict[str, float]:
    """Means of the numeric scores and rates of the boolean ones (key + ``_rate``), plus ``n``."""
    if not scores:
        raise ValueError("cannot summarize an empty list of scores")
    summary: dict[str, float] = {"n": len(scores)}
    for key, first in scores[0].items():
        values = [entry[key] for entry in scores]
        summary[f"{key}_rate" if isinstance(first, bool) else key] = fmean(values)
    return summary


def load_records(path: Path) -> list[dict]:
    """Read a JSON file holding a list of objects, or a JSON Lines file (blank lines allowed).

    A file whose first non-blank character is ``[`` is read as JSON, anything else as JSON Lines. Bad input raises a
    ValueError naming the file and the line (or the list item).
    """
    text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not part of the JSON
    if text.lstrip().startswith("["):
        items = _parsed(text, path, None)
        located = [(f"{path}: item {index}", item) for index, item in enumerate(items)]
    else:
        located = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                located.append((f"{path}:{number}", _parsed(line, path, number)))
    for where, item in located:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if not located:
        raise ValueError(f"{path}: no records")
    return [item for _, item in located]


def _parsed(text: str, path: Path, line: int | None) -> object:
    """json.loads of a whole file (`line` None) or of its line `line`; a failure is a ValueError naming both."""
    where = f"{path}:{line}" if line else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line or error.lineno}: invalid JSON: {error.msg}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested deeper than Python's parser recurses") from None
    except ValueError as error:  # an integer of more digits than int() converts
        raise ValueError(f"{where}: an integer longer than Python converts ({error})") from None


def score_records(records: list[dict]) -> dict[str, dict[str, float]]:
    """Summaries of the scores of every ``*_response`` field that the first record has, keyed by field name."""
    if not records:
        raise ValueError("no records to score")
    fields = [key for key in records[0] if key.endswith("_response")]
    if not fields:
        raise ValueError("the first record has no field whose name ends in '_response'")
    scores: dict[str, list[dict[str, float | int | bool]]] = {field: [] for field in fields}
    for index, record in enumerate(records):
        for field in fields:
            text = record.get(field)
            if not isinstance(text, str):
                problem = "lacks" if field not in record else f"has a non-string ({type(text).__name__})"
                raise ValueError(f"record {index} (counting from 0) {problem} field {field!r}")
            scores[field].append(score(text))
    return {field: summarize(field_scores) for field, field_scores in scores.items()}
