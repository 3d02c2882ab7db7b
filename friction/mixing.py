"""mix's work (stages/mix.py): tokenize the examples once, drop what cannot be trained on, sample the mixture and
split it. The rules, step by step: docs/pipeline.md (Template and tokens, Mixing, Dirty rows).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import click
import numpy as np
import pyarrow as pa
from datasets import Dataset
from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase

from friction.artifacts import base_model_reference
from friction.chatml import (
    IGNORE_INDEX,
    assistant_spans,
    open_assistant_turn,
    turns,
    user_starts,
)
from friction.config import Params
from friction.schemas import BOS_METADATA_KEY, MIXED_SCHEMA, TokenizedExample, row_groups, write_row_groups
from friction.source_rows import (
    FORMAT_NEEDS,
    Example,
    SpecialTexts,
    certainly_over_chars,
    special_token_texts,
)
from friction.token_store import Stored, TokenArrays, TokenStore
from friction.tokens import encode_texts, load_unmapped_tokenizer, map_end_of_turn

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Encoded:
    """An example tokenized: where it came from, and where its text and tokens wait until mix writes them."""

    id: str
    source: str
    line: int
    stored: Stored
    kept_tokens: int
    """The tokens pack will keep of it: all of them, or under `pack.overflow: truncate` at most model.max_length."""

    @property
    def length(self) -> int:
        return self.stored.length


ENCODE_BATCH = 256


def token_holding(encoding: Encoding, position: int, text_length: int) -> int:
    """The index of the first token holding character `position` (char_to_token gives the first of the byte-level
    pieces of a split character), or of the first token after it when none holds it (whitespace that trimmed offsets
    leave out); len(encoding) if there is none."""
    while position < text_length:
        token = encoding.char_to_token(position)
        if token is not None:
            return token
        position += 1
    return len(encoding)


def first_token_from(encoding: Encoding, position: int, text_length: int) -> int:
    """The index of the first token whose text starts at or after character `position` (len(encoding) if none)."""
    token = token_holding(encoding, position, text_length)
    while token < len(encoding) and encoding.token_to_chars(token)[0] < position:
        token += 1  # the token holding `position` starts before it
    return token


def tokenize_batch(
    texts: Sequence[str], encodings: Sequence[Encoding], cut: Sequence[bool] | None = None
) -> list[tuple[list[int], TokenArrays]]:
    """From each text's encoding (`encode_texts`): its token ids (a list, for the round-trip check) with the special
    tokens the tokenizer adds (its BOS), and its TokenArrays: labelled where a token starts inside an assistant span;
    user_starts the first token holding each user header's first character. Token boundaries come from the Rust
    encoding's char_to_token at the few span edges, not from every token's offsets, whose conversion to Python would
    cost a third of the encoding itself. A `cut` text (the head of a row far over model.max_length) that ends inside
    an assistant turn has that turn's content labelled to its end, as the whole row's tokens would be."""
    out = []
    for text, encoding, is_cut in zip(texts, encodings, cut or [False] * len(texts), strict=True):
        token_ids = encoding.ids
        ids = np.array(token_ids, dtype=np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        found = turns(text)
        spans = assistant_spans(text, found)
        tail = open_assistant_turn(text, found) if is_cut else None
        for start, end in spans + ([tail] if tail else []):
            first, stop = first_token_from(encoding, start, len(text)), first_token_from(encoding, end, len(text))
            labels[first:stop] = ids[first:stop]
        turn_starts = [token_holding(encoding, start, len(text)) for start in user_starts(text, found)]
        out.append((token_ids, TokenArrays(ids, labels, np.array(turn_starts, dtype=np.int32))))
    return out


def tokenize(text: str, tokenizer: PreTrainedTokenizerBase) -> TokenizedExample:
    """`tokenize_batch` of one text, as lists."""
    _, tokens = tokenize_batch([text], encode_texts(tokenizer, [text]))[0]
    return TokenizedExample(tokens.input_ids.tolist(), tokens.labels.tolist(), tokens.user_starts.tolist())


def round_trip_problems(
    texts: Sequence[str], token_ids: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase
) -> list[str | None]:
    """Why each text's tokens do not decode back to it (None when they do): a tokenizer that loses text, or one that
    is not the base's (a folder without tokenizer.json can load as something that maps everything to one id)."""
    special = set(tokenizer.all_special_ids) - {tokenizer.convert_tokens_to_ids(tokenizer.eos_token)}
    # Drop what the tokenizer added (BOS), keep <|im_end|>, which is the EOS token and part of the text.
    stripped = []
    for ids in token_ids:
        first = next((index for index, token in enumerate(ids) if token not in special), len(ids))
        stripped.append(ids[first:])
    # The fast tokenizer's own batch decode: what tokenizer.decode(ids, clean_up_tokenization_spaces=False) gives,
    # without its per-token checks in Python.
    decoded_texts = tokenizer.backend_tokenizer.decode_batch(stripped, skip_special_tokens=False)
    normalizer = tokenizer.backend_tokenizer.normalizer
    problems: list[str | None] = []
    for text, decoded in zip(texts, decoded_texts, strict=True):
        # The text itself, or what the tokenizer's normalizer (Qwen2's NFC) makes of it.
        expected = normalizer.normalize_str(text) if decoded != text and normalizer else text
        if decoded == expected:
            problems.append(None)
            continue
        at = next((i for i, (a, b) in enumerate(zip(decoded, expected)) if a != b), min(len(decoded), len(expected)))
        problems.append(
            f"decodes to {decoded[max(at - 20, 0) : at + 20]!r} where the text has {expected[max(at - 20, 0) : at + 20]!r}"
        )
    return problems


def base_tokenizer(manifest_path: Path) -> tuple[PreTrainedTokenizerBase, SpecialTexts]:
    """The base's tokenizer as the original used it, and the texts its special and added tokens have (the base's own
    EOS text among them, read before `map_end_of_turn` renames it)."""
    tokenizer = load_unmapped_tokenizer(*base_model_reference(manifest_path))
    special = special_token_texts(tokenizer)
    return map_end_of_turn(tokenizer), special


def added_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer puts it before every text it encodes (pack's `stacked` layout needs it)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None


def encoded_batches(
    examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[list[Example], list[Encoding]]]:
    """The examples a batch at a time with their encodings. The Rust tokenizer encodes the next batch on a thread of
    its own (it lets go of the GIL) while this one reads that batch's rows before and the caller works on this one."""
    pending = iter(examples)
    with ThreadPoolExecutor(1) as encoder:

        def submit() -> tuple[list[Example], Future[list[Encoding]]]:
            batch = list(itertools.islice(pending, ENCODE_BATCH))
            return batch, encoder.submit(encode_texts, tokenizer, [example.text for example in batch])

        batch, encodings = submit()
        while batch:
            following = submit()
            yield batch, encodings.result()
            batch, encodings = following


def within_reach(
    examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, params: Params, dropped: list[dict]
) -> Iterator[Example]:
    """The examples, a row far over model.max_length recognised by its characters before it is tokenized (whole, one
    30 MB row would cost gigabytes): under `pack.overflow: drop` dropped as over_max_length; under truncate cut to the
    head that holds more than model.max_length tokens for certain (pack keeps the same first max_length tokens);
    under split dropped as far_over_max_length, since pieces of one row without its turns' beginnings would be
    trained as examples of their own."""
    max_length, overflow = params.model.max_length, params.pack.overflow
    limit = certainly_over_chars(max_length, tokenizer)
    for example in examples:
        if len(example.text) <= limit:
            yield example
            continue
        if overflow == "truncate":
            yield Example(example.id, example.source, example.line, example.text[:limit], cut=True)
            continue
        detail = f"{len(example.text)} characters, over model.max_length {max_length} tokens for certain"
        detail += " (not tokenized)"
        reason = "over_max_length" if overflow == "drop" else "far_over_max_length"
        if overflow == "split":
            detail += "; pack.overflow split would make pieces of it that lack the beginning of their turns"
        dropped.append(
            {"source": example.source, "line": example.line, "id": example.id, "reason": reason, "detail": detail}
        )


def encode(
    examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, params: Params, store: TokenStore
) -> list[Encoded]:
    """Tokenize the examples a batch at a time as they are read, into `store`; stop if the tokenizer does not give
    back the text of one (it would train garbage)."""
    cap = params.model.max_length if params.pack.overflow == "truncate" else None
    encoded = []
    for batch, encodings in encoded_batches(examples, tokenizer):
        texts = [example.text for example in batch]
        tokenized = tokenize_batch(texts, encodings, [example.cut for example in batch])
        problems = round_trip_problems(texts, [token_ids for token_ids, _ in tokenized], tokenizer)
        for example, problem in zip(batch, problems, strict=True):
            if problem:
                raise click.ClickException(
                    f"mix: the base model's tokenizer does not reproduce the text of {example.source} line "
                    f"{example.line}: it {problem}; check the base model folder (its tokenizer.json and config.json)"
                )
        for example, stored in zip(batch, store.add(texts, [tokens for _, tokens in tokenized]), strict=True):
            kept = min(stored.length, cap) if cap else stored.length
            encoded.append(Encoded(example.id, example.source, example.line, stored, kept))
    return encoded


def stop_on_empty_sources(by_source: dict[str, list[Encoded]], dropped: list[dict], params: Params) -> None:
    """A source the mix asks rows of (weight > 0) that kept none: most likely the wrong `format`, never a mix."""
    for name, rows in by_source.items():
        if rows or params.mix.weights[name] == 0:
            continue
        source = params.data.sources[name]
        reasons = Counter(record["reason"] for record in dropped if record["source"] == name)
        found = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "no rows"
        raise click.ClickException(
            f"mix: source {name} ({source_location(params, name)}) kept no row as format {source.format!r} "
            f"({found}; a {source.format} row needs {FORMAT_NEEDS[source.format]}); check data.sources.{name}.format "
            f"or set mix.weights.{name}: 0"
        )


def drop_over_length(encoded: list[Encoded], max_length: int, dropped: list[dict]) -> list[Encoded]:
    """Under pack.overflow: drop, a row pack could not take whole is a bad row, dropped before sampling."""
    kept = []
    for row in encoded:
        if row.length > max_length:
            dropped.append(
                {
                    "source": row.source,
                    "line": row.line,
                    "id": row.id,
                    "reason": "over_max_length",
                    "detail": f"{row.length} tokens, over model.max_length {max_length}",
                }
            )
        else:
            kept.append(row)
    return kept


def source_location(params: Params, name: str) -> str:
    """Where the user's copy of source `name` lives: its file under data/sources, or its Hub dataset."""
    source = params.data.sources[name]
    return source.path if source.path is not None else f"{source.hub} (the Hub dataset of data.sources.{name})"


def stop_on_bad_rows(dropped: list[dict], params: Params) -> NoReturn:
    """mix.on_bad_rows: fail. Names the first bad row in file order (source order, then line), whatever the reason."""
    order = list(params.data.sources)
    first = min(dropped, key=lambda record: (order.index(record["source"]), record["line"]))
    raise click.ClickException(
        f"{source_location(params, first['source'])} line {first['line']}: {first['reason']}: {first['detail']} "
        f"({len(dropped)} bad rows in all; set mix.on_bad_rows: drop to skip them)"
    )


def shuffled(items: Sequence[T], seed: int) -> list[T]:
    """`items` in the order datasets' Dataset.shuffle(seed=seed) gives a table of them (the original's shuffle)."""
    if not items:
        return []
    order = Dataset.from_dict({"position": range(len(items))}).shuffle(seed=seed).with_format("numpy")[:]["position"]
    return [items[position] for position in order.tolist()]


def train_validation_split(items: Sequence[T], validation_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """datasets' train_test_split(test_size=validation_fraction, seed=seed) of a table of `items`."""
    positions = Dataset.from_dict({"position": range(len(items))})
    split = positions.train_test_split(test_size=validation_fraction, seed=seed)
    train, test = (split[part].with_format("numpy")[:]["position"].tolist() for part in ("train", "test"))
    return [items[p] for p in train], [items[p] for p in test]


def rows_within(rows: list[Encoded], token_limit: int) -> int:
    """How many leading rows fit in `token_limit` tokens: the walk stops at the first row that would pass it."""
    total = 0
    for count, row in enumerate(rows):
        total += row.length
        if total > token_limit:
            return count
    return len(rows)


def sample(by_source: dict[str, list[Encoded]], params: Params) -> tuple[list[Encoded], dict]:
    """The mixture in its final order, and the report's sampling numbers (rules in the module docstring)."""
    available = sum(len(rows) for rows in by_source.values())
    available_tokens = sum(row.kept_tokens for rows in by_source.values() for row in rows)
    asked_total = min(params.mix.target_max, int(params.mix.target_fraction * available))
    budget = asked_total * available_tokens // available if available else 0
    by_tokens = params.mix.weighting == "tokens"
    parts, report = [], {}
    for name, rows in by_source.items():
        weight = params.mix.weights[name]
        asked, tokens_asked = int(asked_total * weight), int(budget * weight)
        source_tokens = sum(row.kept_tokens for row in rows)
        order = shuffled(rows, params.seed)
        taken = order[: rows_within(order, tokens_asked) if by_tokens else min(asked, len(rows))]
        parts += taken
        report[name] = {
            "available": len(rows),
            "available_tokens": source_tokens,
            "asked": asked,
            "sampled": len(taken),
            "tokens_asked": tokens_asked,
            "tokens": sum(row.kept_tokens for row in taken),
            "capped": source_tokens < tokens_asked if by_tokens else len(rows) < asked,
            "empty": not rows,
        }
    if not parts:
        raise click.ClickException("mix: no examples sampled; check data.sources and mix.weights in params.yaml")
    sampled_tokens = sum(row.kept_tokens for row in parts)
    for counts in report.values():
        counts["token_share"] = round(counts["tokens"] / sampled_tokens, 4)
    summary = {
        "weighting": params.mix.weighting,
        "available": available,
        "available_tokens": available_tokens,
        "asked": asked_total,
        "tokens_asked": budget,
        "sampled": len(parts),
        "tokens": sampled_tokens,
    }
    return shuffled(parts, params.seed), {"sources": report, **summary}


def write_parquet(rows: list[Encoded], store: TokenStore, path: Path, bos_token_id: int | None) -> None:
    """`rows` in that order, a row group of at most ROW_GROUP_TOKENS tokens at a time read from `store`."""
    schema = MIXED_SCHEMA if bos_token_id is None else MIXED_SCHEMA.with_metadata({BOS_METADATA_KEY: str(bos_token_id)})

    def group(first: int, last: int) -> pa.Table:
        chosen = rows[first:last]
        columns = {
            "id": pa.array([row.id for row in chosen], type=pa.string()),
            "source": pa.array([row.source for row in chosen], type=pa.string()),
            **store.columns([row.stored for row in chosen]),
        }
        return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)

    lengths = np.fromiter((row.length for row in rows), dtype=np.int64, count=len(rows))
    write_row_groups(path, schema, (group(first, last) for first, last in row_groups(lengths)))


def echo_report(report: dict) -> None:
    unit = "tokens" if report["weighting"] == "tokens" else "rows"
    for name, counts in report["sources"].items():
        asked = counts["tokens_asked"] if unit == "tokens" else counts["asked"]
        click.echo(
            f"mix: {name}: {counts['rows_in']} rows in, {counts['kept']} kept, {counts['sampled']} sampled "
            f"({counts['tokens']} tokens, {counts['token_share']:.1%} of the mix)"
            + (f" (capped: asked {asked} {unit})" if counts["capped"] else "")
            + (f", {counts['over_max_length']} over model.max_length" if counts["over_max_length"] else "")
        )
        if counts["empty"]:
            click.echo(f"mix: warning: source {name} has no clean rows")
    if not report["weights_sum_is_one"]:
        click.echo(f"mix: warning: mix.weights sum to {report['weights_sum']}, not 1; they are not renormalised")
    click.echo(f"mix: {report['train']} train / {report['validation']} validation examples")
