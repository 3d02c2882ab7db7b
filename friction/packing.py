"""Packing: the examples mix tokenized, laid into rows of at most model.max_length tokens (docs/pipeline.md, Packing).

Tokens stay in flat numpy arrays from read to write (`TokenColumns`), a few bytes a token instead of a Python object
each, and best-fit-decreasing finds a row in O(log max_length), so a million examples pack in seconds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from friction.chatml import IGNORE_INDEX
from friction.config import Params
from friction.schemas import (
    PACKED_SCHEMA,
    TokenizedExample,
    bos_token_id,
    read_parquet,
    row_groups,
    write_row_groups,
)

MIXED_COLUMNS = ["id", "input_ids", "labels", "user_starts"]
# An example, or the part of one that fits a row (the tests' and small callers' form; pack itself keeps columns).
Piece = TokenizedExample


@dataclass(frozen=True)
class TokenColumns:
    """Examples as flat numpy columns, how pack holds them from read to write (no Python object per token):
    example i's tokens are ids[offsets[i]:offsets[i + 1]], with their labels, and `user_start` marks the tokens
    where a user turn's header starts."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where nothing is trained
    offsets: np.ndarray  # int64, one more than there are examples
    user_start: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_pieces(cls, pieces: Sequence[Piece]) -> TokenColumns:
        lengths = np.fromiter((len(piece.input_ids) for piece in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        user_start = np.zeros(int(offsets[-1]), dtype=bool)
        for piece, start in zip(pieces, offsets[:-1]):
            user_start[[start + index for index in piece.user_starts if 0 <= index < len(piece.input_ids)]] = True
        flat = [token for piece in pieces for token in piece.input_ids]
        labels = [label for piece in pieces for label in piece.labels]
        return cls(np.array(flat, dtype=np.int32), np.array(labels, dtype=np.int32), offsets, user_start)

    def pieces(self, starts: np.ndarray, ends: np.ndarray) -> list[Piece]:
        return [
            Piece(
                self.ids[start:end].tolist(),
                self.labels[start:end].tolist(),
                (np.flatnonzero(self.user_start[start:end])).tolist(),
            )
            for start, end in zip(starts.tolist(), ends.tolist())
        ]


def best_fit_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bin indices of `lengths` into rows of at most `capacity` tokens, longest first (ties in index order), each into
    the fullest row that still has room (the lowest-numbered one among equally full rows).

    Rows are kept in buckets by the space they have left, a min-heap of row numbers per bucket, and a segment tree
    over the buckets finds the smallest space that still fits in O(log capacity): n log(capacity) in all."""
    size = 1 << max(capacity, 1).bit_length()  # leaves for spaces 0..capacity
    tree = [0] * (2 * size)  # how many rows have a space in each node's range
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]
    rows: list[list[int]] = []

    def add(space: int, row: int, delta: int) -> None:
        if delta > 0:
            heapq.heappush(buckets[space], row)
        node = space + size
        while node:
            tree[node] += delta
            node >>= 1

    def smallest_space_at_least(length: int) -> int | None:
        node = length + size
        if tree[node]:
            return length
        while node > 1:
            if not node & 1 and tree[node + 1]:  # a left child whose right sibling holds a row
                node += 1
                while node < size:
                    node = 2 * node if tree[2 * node] else 2 * node + 1
                return node - size
            node >>= 1
        return None

    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        space = smallest_space_at_least(length) if length <= capacity else None
        if space is None:
            rows.append([index])
            if length <= capacity:  # a longer one (callers cut them first) leaves no room for anything
                add(capacity - length, len(rows) - 1, +1)
        else:
            row = heapq.heappop(buckets[space])
            add(space, row, -1)
            rows[row].append(index)
            add(space - length, row, +1)
    return rows


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin indices of `lengths` into rows of at most `capacity` tokens, longest first, each into the fullest row
    that still has room."""
    return best_fit_rows(np.asarray(lengths, dtype=np.int64), capacity)


def next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The original "stacking": walk in order, start a new row when the next example would not fit."""
    rows: list[list[int]] = []
    used = capacity
    for index, length in enumerate(lengths):
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def cut(
    examples: TokenColumns, starts: np.ndarray, capacity: int, overflow: str
) -> tuple[np.ndarray, np.ndarray, Counter[str]]:
    """Cut over-length examples (their tokens from `starts`) as `overflow` says; drop what has no label left.
    Returns the kept pieces' (start, end) token positions, in example order, and the counts."""
    ends = examples.offsets[1:]
    lengths = ends - starts
    split = (lengths > capacity) if overflow == "split" else np.zeros(len(lengths), dtype=bool)
    # truncate: under drop, mix left no over-length example and read_split refuses one
    pieces_per_example = np.where(split, -(-lengths // capacity), 1)
    example_of = np.repeat(np.arange(len(lengths)), pieces_per_example)
    first_piece = np.concatenate([[0], np.cumsum(pieces_per_example)[:-1]]).astype(np.int64)
    piece_starts = starts[example_of] + (np.arange(len(example_of)) - first_piece[example_of]) * capacity
    piece_ends = np.minimum(piece_starts + capacity, ends[example_of])
    trained = has_label(examples.labels, piece_starts, piece_ends)
    truncated = (lengths > capacity) & ~split
    counts: Counter[str] = Counter(
        truncated=int(trained[truncated[example_of]].sum()),  # an example cut and then dropped is counted as dropped
        split=int(split.sum()),
        split_pieces=int(pieces_per_example[split].sum()),
        dropped_without_labels=int((~trained).sum()),
    )
    return piece_starts[trained], piece_ends[trained], counts


def has_label(labels: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each token range [start, end) holds a trained label."""
    if not len(starts):
        return np.zeros(0, dtype=bool)
    labelled = np.append(labels != IGNORE_INDEX, False)  # the sentinel lets a range end at the last token
    bounds = np.stack([starts, ends], axis=1).ravel()
    return (np.logical_or.reduceat(labelled, bounds)[::2]) & (ends > starts)


def fit(examples: list[Piece], capacity: int, overflow: str) -> tuple[list[Piece], Counter[str]]:
    """Cut over-length examples as `overflow` says; drop what has no label left. Returns the pieces and counts."""
    columns = TokenColumns.from_pieces(examples)
    starts, ends, counts = cut(columns, columns.offsets[:-1], capacity, overflow)
    return columns.pieces(starts, ends), counts


def stacked_labels(ids: np.ndarray, labels: np.ndarray, user_start: np.ndarray, row_starts: np.ndarray) -> np.ndarray:
    """The original's labels over stacked rows laid end to end: each run from an assistant turn to the next user
    turn; a row starts with no run open. A labelled token opens (or continues) a run, a user turn's header closes it."""
    event = np.where(labels != IGNORE_INDEX, 1, np.where(user_start, 0, -1)).astype(np.int8)
    event[row_starts] = np.maximum(event[row_starts], 0)
    last_event = np.maximum.accumulate(np.where(event >= 0, np.arange(len(event)), 0))
    return np.where(event[last_event] == 1, ids, IGNORE_INDEX)


CHUNK_TOKENS = 1 << 22  # rows are laid out this many tokens at a time, to bound the temporary index arrays


def row_chunks(row_offsets: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive ranges of rows of about CHUNK_TOKENS tokens each."""
    bounds = np.searchsorted(row_offsets, np.arange(0, int(row_offsets[-1]), CHUNK_TOKENS), side="right") - 1
    bounds = sorted(set(bounds.tolist()) | {len(row_offsets) - 1})
    return list(itertools.pairwise(bounds))


def lay_out(
    examples: TokenColumns,
    starts: np.ndarray,
    lengths: np.ndarray,
    row_of: np.ndarray,
    row_offsets: np.ndarray,
    bos: int | None,
    stacked: bool,
    ids: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Write the tokens of consecutive rows into `ids` and `labels`: the pieces (`starts`, `lengths`, in row order)
    end to end, with a BOS before each row if `bos`. `row_offsets` are where the rows start, and `row_of` each
    piece's row, counted from the first of these rows."""
    base = row_offsets[0]
    row_bos = bos is not None
    # Where each piece's first token goes: after the pieces before it, and one BOS per row up to and including its own.
    destinations = np.cumsum(lengths) - lengths + (row_of - row_of[0] + 1) * row_bos if len(lengths) else lengths
    taken = np.arange(len(ids))
    if row_bos:
        is_bos = np.zeros(len(ids), dtype=bool)
        is_bos[row_offsets[:-1] - base] = True
        taken = taken[~is_bos]
        ids[is_bos] = bos
        labels[is_bos] = IGNORE_INDEX
    sources = np.repeat(starts - destinations, lengths) + taken
    ids[taken] = examples.ids[sources]
    labels[taken] = examples.labels[sources]
    if stacked:
        user_start = np.zeros(len(ids), dtype=bool)
        user_start[taken] = examples.user_start[sources]
        labels[:] = stacked_labels(ids, labels, user_start, row_offsets[:-1] - base)


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=pa.int64()))


@dataclass(frozen=True)
class Layout:
    """Which piece of which example goes where: everything pack decides before it writes a token. Pieces are in row
    order; rows are laid out a range at a time (`rows`), so that only the rows being written are in memory."""

    examples: TokenColumns
    piece_starts: np.ndarray  # where each piece's tokens start in `examples`
    piece_lengths: np.ndarray
    piece_offsets: np.ndarray  # row r holds pieces piece_offsets[r]:piece_offsets[r + 1]
    row_lengths: np.ndarray  # tokens, its BOS included
    bos: int | None  # stacked: the BOS that starts every row
    stacked: bool
    counts: Counter[str]

    def __len__(self) -> int:
        return len(self.row_lengths)

    @cached_property
    def row_offsets(self) -> np.ndarray:
        """Where each row starts in the rows laid end to end, and where the last ends."""
        return np.concatenate([[0], np.cumsum(self.row_lengths)]).astype(np.int64)

    def rows(self, first: int, last: int) -> pa.Table:
        """Rows first..last-1 as a table of PACKED_SCHEMA."""
        token_offsets = self.row_offsets[first : last + 1] - self.row_offsets[first]
        piece_offsets = self.piece_offsets[first : last + 1] - self.piece_offsets[first]
        pieces = slice(self.piece_offsets[first], self.piece_offsets[last])
        starts, lengths = self.piece_starts[pieces], self.piece_lengths[pieces]
        row_of = np.repeat(np.arange(last - first), np.diff(piece_offsets))
        ids = np.empty(int(token_offsets[-1]), dtype=np.int64)
        labels = np.empty(len(ids), dtype=np.int64)
        for start, stop in row_chunks(token_offsets):
            chunk = slice(piece_offsets[start], piece_offsets[stop])
            tokens = slice(token_offsets[start], token_offsets[stop])
            lay_out(
                self.examples,
                starts[chunk],
                lengths[chunk],
                row_of[chunk],
                token_offsets[start : stop + 1],
                self.bos,
                self.stacked,
                ids[tokens],
                labels[tokens],
            )
        if self.stacked:
            seq_offsets, seq_lengths = np.arange(last - first + 1), self.row_lengths[first:last]
        else:
            seq_offsets, seq_lengths = piece_offsets, lengths
        return pa.Table.from_arrays(
            [list_array(token_offsets, ids), list_array(token_offsets, labels), list_array(seq_offsets, seq_lengths)],
            schema=PACKED_SCHEMA,
        )

    def metrics(self, trained_tokens: int, max_length: int) -> dict:
        real_tokens = int(self.row_offsets[-1])
        slots = len(self) * max_length
        return {
            "examples": len(self.examples),
            **self.counts,
            "packed_examples": len(self.piece_lengths),
            "rows": len(self),
            "real_tokens": real_tokens,
            "trained_tokens": trained_tokens,
            "padded_slots": slots - real_tokens,
            "fill_ratio": round(real_tokens / slots, 4) if slots else 0.0,
        }


def plan(examples: TokenColumns, params: Params, bos: int | None = None) -> Layout:
    """Cut `examples` to fit and bin them into rows. `bos`: the BOS id the tokenizer put before every example."""
    capacity = params.model.max_length
    stacked = params.pack.strategy == "stacked"
    row_bos = 1 if stacked and bos is not None else 0  # stacked: one BOS a row, as the original tokenized it
    starts = examples.offsets[:-1].copy()
    if row_bos:
        nonempty = examples.offsets[1:] > starts
        starts[nonempty] += examples.ids[starts[nonempty]] == bos
    piece_starts, piece_ends, counts = cut(examples, starts, capacity - row_bos, params.pack.overflow)
    lengths = piece_ends - piece_starts
    members = next_fit(lengths.tolist(), capacity - row_bos) if stacked else best_fit_rows(lengths, capacity - row_bos)
    order = np.fromiter((m for row in members for m in row), dtype=np.int64, count=len(lengths))
    pieces_per_row = np.fromiter((len(row) for row in members), dtype=np.int64, count=len(members))
    row_of = np.repeat(np.arange(len(members)), pieces_per_row)
    row_lengths = np.bincount(row_of, weights=lengths[order], minlength=len(members)).astype(np.int64) + row_bos
    return Layout(
        examples=examples,
        piece_starts=piece_starts[order],
        piece_lengths=lengths[order],
        piece_offsets=np.concatenate([[0], np.cumsum(pieces_per_row)]).astype(np.int64),
        row_lengths=row_lengths,
        bos=bos if row_bos else None,
        stacked=stacked,
        counts=counts,
    )


def trained_tokens(table: pa.Table) -> int:
    return int(np.count_nonzero(pc.list_flatten(table.column("labels")).to_numpy() != IGNORE_INDEX))


def pack_columns(examples: TokenColumns, params: Params, bos: int | None = None) -> tuple[pa.Table, dict]:
    """All rows of `examples` as one table, and their counts."""
    layout = plan(examples, params, bos)
    table = layout.rows(0, len(layout))
    return table, layout.metrics(trained_tokens(table), params.model.max_length)


def pack_split(
    examples: list[Piece], params: Params, bos: int | None = None
) -> tuple[dict[str, list[list[int]]], dict]:
    """`pack_columns` of examples given one by one, its rows as Python lists."""
    table, metrics = pack_columns(TokenColumns.from_pieces(examples), params, bos)
    return table.to_pydict(), metrics


def write_rows(layout: Layout, path: Path) -> int:
    """The rows, a row group of about ROW_GROUP_TOKENS tokens at a time; returns how many tokens are trained."""
    trained = 0

    def groups() -> Iterator[pa.Table]:
        nonlocal trained
        for first, last in row_groups(layout.row_lengths):
            table = layout.rows(first, last)
            trained += trained_tokens(table)
            yield table

    write_row_groups(path, PACKED_SCHEMA, groups())
    return trained


def read_split(path: Path, params: Params) -> tuple[TokenColumns, int | None]:
    """The examples of one mixed split and the BOS id they start with; a malformed file, or a row pack must not see,
    stops the stage."""
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise click.ClickException(f"{path}: missing; run the stage that writes it (dvc repro mix)") from None
    except (pa.ArrowException, OSError) as error:
        raise click.ClickException(f"{path}: not a readable Parquet file ({error}); rerun mix") from None
    missing = [name for name in MIXED_COLUMNS if name not in schema.names]
    if missing:
        raise click.ClickException(f"{path}: no column {missing[0]!r}; rerun mix")
    for name in TOKEN_LISTS:
        kind = schema.field(name).type
        values = kind.value_type if pa.types.is_list(kind) else None
        if values is None or not (pa.types.is_integer(values) or pa.types.is_null(values)):  # null: all lists empty
            raise click.ClickException(f"{path}: column {name!r} is {kind}, not lists of token ids; rerun mix")
    try:
        flat, lengths = read_token_lists(path)
    except (pa.ArrowException, OSError) as error:
        raise click.ClickException(f"{path}: not a readable Parquet file ({error}); rerun mix") from None
    capacity = params.model.max_length

    def where(index: int) -> str:
        row_id = read_parquet(path, ["id"], rerun="mix").column("id")[index].as_py()
        return f"{path} row {index} (id {row_id})"

    for index in np.flatnonzero(lengths["input_ids"] != lengths["labels"])[:1].tolist():
        raise click.ClickException(
            f"{where(index)}: {lengths['input_ids'][index]} input_ids but {lengths['labels'][index]} labels; rerun mix"
        )
    if params.pack.overflow == "drop":
        for index in np.flatnonzero(lengths["input_ids"] > capacity)[:1].tolist():
            raise click.ClickException(
                f"{where(index)}: {lengths['input_ids'][index]} tokens, over model.max_length {capacity} under "
                "pack.overflow: drop; rerun mix, which drops such rows"
            )
    offsets = np.concatenate([[0], np.cumsum(lengths["input_ids"])]).astype(np.int64)
    row_of = np.repeat(np.arange(len(offsets) - 1), lengths["user_starts"])
    in_row = flat["user_starts"].astype(np.int64)
    inside = (in_row >= 0) & (in_row < lengths["input_ids"][row_of])
    user_start = np.zeros(len(flat["input_ids"]), dtype=bool)
    user_start[offsets[row_of[inside]] + in_row[inside]] = True
    return TokenColumns(flat["input_ids"], flat["labels"], offsets, user_start), bos_token_id(schema)


TOKEN_LISTS = ("input_ids", "labels", "user_starts")


def read_token_lists(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each of TOKEN_LISTS' values end to end (int32), and each row's number of them: read a row group at a time
    into arrays sized from the file's metadata, so that the whole table is never in memory besides them."""
    file = pq.ParquetFile(path, page_checksum_verification=True)
    metadata = file.metadata
    leaf = {metadata.schema.column(index).path.split(".")[0]: index for index in range(metadata.num_columns)}
    groups = range(metadata.num_row_groups)
    # A column chunk's value count is the tokens in it, plus one for each empty list: at least what it holds.
    flat = {
        name: np.empty(sum(metadata.row_group(g).column(leaf[name]).num_values for g in groups), dtype=np.int32)
        for name in TOKEN_LISTS
    }
    lengths: dict[str, list[np.ndarray]] = {name: [] for name in TOKEN_LISTS}
    filled = dict.fromkeys(TOKEN_LISTS, 0)
    for group in groups:
        table = file.read_row_group(group, columns=list(TOKEN_LISTS))
        for name in TOKEN_LISTS:
            column = table.column(name).combine_chunks()
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            flat[name][filled[name] : filled[name] + len(values)] = values
            filled[name] += len(values)
            lengths[name].append(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    return (
        {name: values[: filled[name]] for name, values in flat.items()},
        {
            name: np.concatenate([np.zeros(0, dtype=np.int64), *parts]).astype(np.int64)
            for name, parts in lengths.items()
        },
    )
