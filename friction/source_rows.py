"""A source's rows as read from disk, and the checks that make a hostile or careless row a dropped row, not a
traceback or a forged token.

Shared by fetch (which counts rows) and mix (which reads them), so both count the same lines: a line is a row unless
it is blank once a UTF-8 byte-order mark at the start of the file is taken off.

- Parsing (`parse_row`): not UTF-8, not JSON, nested deeper than Python's JSON parser recurses, or an integer longer
  than Python converts (`sys.get_int_max_str_digits()`), each a BadRow with its own reason.
- Text fields (`check_field`): a lone surrogate (an escaped `\\ud800` is valid JSON but no Unicode text) cannot be
  encoded, tokenized or written; text that spells a special or added token of the tokenizer would become that token
  (a second BOS, an EOS inside a question, a forged assistant turn), so text a dataset puts inside a field stays
  text only by dropping the row (`SpecialTexts`).
- The ChatML of a reluctance row is its structure: `<|im_start|>`/`<|im_end|>` may only open and close its turns,
  `<judging>` blocks must be balanced, and no other special-token text (BOS, the base's EOS) may appear in it.
- A row far longer than model.max_length is recognised by its character count before tokenization
  (`certainly_over_chars`), so one 30 MB line does not cost gigabytes of token offsets.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import click
from transformers import PreTrainedTokenizerBase

from friction.chatml import (
    IM_END,
    IM_START,
    THINK_CLOSE,
    THINK_OPEN,
    assistant_content,
    render,
    turns,
)
from friction.config import LOCAL_SOURCES_DIR

UTF8_BOM = b"\xef\xbb\xbf"
JUDGING_OPEN, JUDGING_CLOSE = "<judging>", "</judging>"
CHATML_MARKERS = frozenset({IM_START, IM_END, THINK_OPEN, THINK_CLOSE})
"""Texts the recipe's template gives meaning to, whatever the tokenizer: never inside a friction row's field."""

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRow(Exception):
    """A row that cannot become a training example: `kind` names the reason in reports, the message details it."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def source_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every row of a JSON Lines file: its non-blank lines, the first without a byte-order
    mark (an editor's, not part of the row; a first line holding only one is blank)."""
    for line_number, raw in enumerate(handle, start=1):
        if line_number == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
        if raw.strip():
            yield line_number, raw


def local_source_file(name: str, path: str) -> Path:
    """The file of local source `name`, which must lie inside data/sources/ once links are resolved: fetch's DVC
    dependency is that folder, and a link out of it (to /etc/passwd, say) would copy a file nobody meant to share."""
    file = Path(path)
    if not file.is_file():
        raise click.ClickException(f"data.sources.{name}.path: {path} is not a file")
    real = file.resolve()
    if not real.is_relative_to(LOCAL_SOURCES_DIR.resolve()):
        raise click.ClickException(
            f"data.sources.{name}.path: {path} is a link to {real}, outside {LOCAL_SOURCES_DIR}/; local sources live "
            f"inside it (where DVC tracks them): copy the file there instead of linking to it"
        )
    return real


def count_rows(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in source_lines(handle))


def parse_row(raw: bytes) -> object:
    """One line as JSON, or a BadRow saying why it cannot be read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRow("invalid_utf8", "not valid UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise BadRow("invalid_json", "not valid JSON") from None
    except RecursionError:
        raise BadRow("too_deeply_nested", "JSON nested deeper than Python's parser recurses") from None
    except ValueError as error:  # int() refuses a number of more digits than sys.get_int_max_str_digits()
        raise BadRow("integer_too_long", f"an integer longer than Python converts ({error})") from None


class SpecialTexts:
    """The texts that tokenize as a special or added token (or are ChatML structure): found in a field, they would
    forge that token, so the row is dropped (reason `special_token_text`)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = frozenset(text for text in texts if text)
        # Longest first, so a text that contains a shorter one is named whole.
        alternatives = sorted(self.texts, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def without(self, allowed: Iterable[str]) -> SpecialTexts:
        return SpecialTexts(self.texts - set(allowed))

    def first_in(self, text: str) -> str | None:
        found = self.pattern.search(text) if self.pattern else None
        return found.group() if found else None


CHATML_ONLY = SpecialTexts(CHATML_MARKERS)
NO_SPECIAL_TEXTS = SpecialTexts(())


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> SpecialTexts:
    """Every text the tokenizer turns into one special or added token (its BOS and EOS among them: call this before
    `map_end_of_turn` renames the EOS, so that the base's own EOS text is caught too), and the ChatML markers."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values()]
    return SpecialTexts([*added, *tokenizer.all_special_tokens, *CHATML_MARKERS])


def check_field(value: str, key: str, special: SpecialTexts) -> None:
    """A text field must be Unicode text and must not spell a special token."""
    if LONE_SURROGATE.search(value):
        raise BadRow("lone_surrogate", f"field '{key}' holds a lone surrogate (an escaped \\ud800-\\udfff): not text")
    found = special.first_in(value)
    if found is not None:
        raise BadRow("special_token_text", f"field '{key}' holds the special-token text {found!r}")


def check_judging(text: str) -> None:
    """<judging> and </judging> alternate, opening first, each block closed."""
    depth = 0
    for tag in re.findall(f"{re.escape(JUDGING_OPEN)}|{re.escape(JUDGING_CLOSE)}", text):
        depth += 1 if tag == JUDGING_OPEN else -1
        if depth not in (0, 1):
            what = "a </judging> without its <judging>" if depth < 0 else "a <judging> inside another"
            raise BadRow("unbalanced_judging", f"'text' has {what}")
    if depth:
        raise BadRow("unbalanced_judging", "'text' has a <judging> that is never closed")


def check_chatml_structure(text: str, found: list[re.Match[str]], special: SpecialTexts) -> None:
    """A reluctance row's ChatML (`found`: its turns): every <|im_start|> opens a turn and every <|im_end|> closes one
    (none inside a turn or left over, where they would forge a turn or an EOS), and no other special-token text
    anywhere (BOS, the base's EOS...)."""
    other = special.without(CHATML_MARKERS).first_in(text)
    if other is not None:
        raise BadRow("special_token_text", f"'text' holds the special-token text {other!r}")
    for marker in (IM_START, IM_END):
        if text.count(marker) != len(found):
            raise BadRow(
                "special_token_text",
                f"'text' has {text.count(marker)} {marker} for {len(found)} ChatML turns: one inside a turn or in none",
            )


CHARS_PER_TOKEN_MARGIN = 2
"""How generous `certainly_over_chars` is beyond the longest token: normalisation may shorten a text a little."""


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token can stand for: the longest entry of the vocabulary (a byte-level BPE writes a
    byte as one character, so this bounds the bytes, and so the characters, a token covers)."""
    return max(len(token) for token in tokenizer.get_vocab())


def certainly_over_chars(max_length: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """A character count above which a text has more than `max_length` tokens for certain, without tokenizing it:
    no token covers more than `longest_token_chars`, with a margin of CHARS_PER_TOKEN_MARGIN."""
    return max_length * longest_token_chars(tokenizer) * CHARS_PER_TOKEN_MARGIN


GENERATOR_ERROR = re.compile(r"^\s*Error:")

FORMAT_NEEDS = {
    "friction": "'question', 'agent_responses' with 'thought_stream's and 'final_answer'",
    "reluctance": "a ChatML conversation in 'text' with an assistant turn",
}


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    source: str
    line: int
    text: str
    cut: bool = False
    """Only the first characters of the row's text (it is far over model.max_length, and pack truncates it)."""


def _text(row: dict, key: str, special: SpecialTexts | None) -> str:
    """The text field `key` of a row; `special`: the special-token texts it must not hold (None: not checked here)."""
    value = row.get(key)
    if value is None:  # a Hub dataset's Arrow table turns a missing field into null
        raise BadRow("missing_field", f"missing field '{key}'")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{key}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRow("empty_field", f"empty field '{key}'")
    if GENERATOR_ERROR.match(value):
        raise BadRow("generator_error", f"generator error in '{key}'")
    check_field(value, key, special or NO_SPECIAL_TEXTS)
    return value


def friction_messages(row: dict, system_prompt: str, special: SpecialTexts = CHATML_ONLY) -> list[dict[str, str]]:
    """friction-* rows: a question, five agents' thought streams, a final answer (original-recipe.md section 3).
    No field may hold a text of `special` (the tokenizer's special and added tokens, the ChatML markers)."""
    question = _text(row, "question", special)
    agents = row.get("agent_responses")
    if agents is None:
        raise BadRow("missing_field", "missing field 'agent_responses'")
    if not isinstance(agents, list) or not all(isinstance(agent, dict) for agent in agents):
        raise BadRow("wrong_type", "field 'agent_responses' is not a list of objects")
    if not agents:
        raise BadRow("empty_field", "empty field 'agent_responses'")
    thoughts = "\n\n".join(_text(agent, "thought_stream", special) for agent in agents)
    answer = _text(row, "final_answer", special)
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
        {"role": "assistant", "content": assistant_content(thoughts, answer)},
    ]


def friction_text(row: dict, system_prompt: str, special: SpecialTexts = CHATML_ONLY) -> str:
    return render(friction_messages(row, system_prompt, special))


def reluctance_text(row: dict, special: SpecialTexts = CHATML_ONLY) -> str:
    """reluctance-* rows: a whole ChatML conversation in `text`, reasoning in a <judging> block, trained verbatim as
    the original did (only the tags renamed); the turns are read to check them and to find the trained spans. Its
    ChatML markers must be its turns' and its <judging> blocks balanced; no other text of `special` may appear."""
    raw = _text(row, "text", None)
    check_judging(raw)
    text = raw.replace("<judging>", THINK_OPEN).replace("</judging>", THINK_CLOSE)
    found = turns(text)
    if not any(turn.group(1) == "assistant" for turn in found):
        raise BadRow("no_assistant_turn", "no assistant turn in 'text'")
    check_chatml_structure(text, found, special)
    for turn in found:
        role, content = turn.group(1), turn.group(2)
        reply = content.rpartition(THINK_CLOSE)[2]
        if not content.strip() or not reply.strip():
            raise BadRow("empty_field", f"empty {role} turn in 'text'")
        if GENERATOR_ERROR.match(reply.lstrip("\n")):
            raise BadRow("generator_error", f"generator error in {role} turn of 'text'")
    return text


def read_source(
    path: Path,
    name: str,
    source_format: str,
    system_prompt: str,
    dropped: list[dict],
    special: SpecialTexts = CHATML_ONLY,
) -> Iterator[Example]:
    """Parse one fetched source a line at a time (the rows fetch counted: friction/source_rows.py): yield its examples,
    and add a record to `dropped` for every row that cannot be trained on."""
    with path.open("rb") as handle:
        for line_number, raw in source_lines(handle):
            try:
                row = parse_row(raw)
                if not isinstance(row, dict):
                    raise BadRow("wrong_type", "not a JSON object")
                if source_format == "friction":
                    text = friction_text(row, system_prompt, special)
                else:
                    text = reluctance_text(row, special)
                row_id = row.get("id")
                if isinstance(row_id, str):
                    check_field(row_id, "id", NO_SPECIAL_TEXTS)  # written to the outputs
            except BadRow as bad:
                dropped.append({"source": name, "line": line_number, "reason": bad.kind, "detail": str(bad)})
                continue
            row_id = str(row_id) if row_id is not None else f"{name}:{line_number}"
            yield Example(row_id, name, line_number, text)


def unique(examples: Iterable[Example], duplicates: list[dict]) -> Iterator[Example]:
    """The first of examples whose text is identical, within and across sources; a record in `duplicates` for each
    other one. Only a digest of each text is kept."""
    first_of: dict[bytes, tuple[str, int, str]] = {}
    for example in examples:
        key = hashlib.sha256(example.text.encode()).digest()
        first = first_of.get(key)
        if first is None:
            first_of[key] = (example.source, example.line, example.id)
            yield example
        else:
            duplicates.append(
                {
                    "source": example.source,
                    "line": example.line,
                    "id": example.id,
                    "reason": "duplicate",
                    "detail": f"duplicate of {first[0]} line {first[1]} (id {first[2]})",
                }
            )
