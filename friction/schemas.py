"""The files the stages hand each other, defined once: mix's examples, pack's rows, and the tokenized example.

- data/mixed/{train,validation}.parquet (mix -> pack): one example a row, MIXED_SCHEMA. The file's metadata holds
  the tokenizer's BOS id (BOS_METADATA_KEY; absent when it has none), which pack's `stacked` layout needs.
- data/packed/{train,validation}.parquet (pack -> train, evaluate; bench writes its own): PACKED_SCHEMA, TRL's
  padding-free format.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKEN_IDS = pa.list_(pa.int32())
MIXED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),  # what was tokenized, as the original trained on it
        ("input_ids", TOKEN_IDS),
        ("labels", TOKEN_IDS),  # the token id where trained, IGNORE_INDEX elsewhere
        ("user_starts", TOKEN_IDS),  # the token index of every user turn's header
    ]
)
BOS_METADATA_KEY = b"friction.bos_token_id"

PACKED_SCHEMA = pa.schema([(name, pa.list_(pa.int64())) for name in ("input_ids", "labels", "seq_lengths")])


ROW_GROUP_TOKENS = 1 << 24
"""A stage writes its rows in row groups of about this many tokens (64 MiB of int32 ids): what it holds in memory to
write one, and what a reader streams at a time. A split of fewer tokens is one row group, the bytes pyarrow's
write_table gives the whole table."""


def row_groups(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive (first, last) ranges of rows whose `lengths` sum to about ROW_GROUP_TOKENS each (a range ends with
    the row that reaches the limit); one range, maybe empty, when they all fit."""
    ends = np.cumsum(lengths)
    limits = np.arange(ROW_GROUP_TOKENS, int(ends[-1]) if len(ends) else 0, ROW_GROUP_TOKENS)
    bounds = np.searchsorted(ends, limits, side="left") + 1
    bounds = sorted({0, len(lengths), *bounds.tolist()})
    return list(itertools.pairwise(bounds)) or [(0, 0)]


def write_row_groups(path: Path, schema: pa.Schema, groups: Iterable[pa.Table]) -> None:
    """One row group per table (each split at pyarrow's default of 1M rows), with a checksum on every page, so that a
    bit flipped on disk or in transfer is an error when read, not wrong ids."""
    with pq.ParquetWriter(path, schema, write_page_checksum=True) as writer:
        for table in groups:
            writer.write_table(table)


def write_parquet(table: pa.Table, path: Path) -> None:
    """`table` as one file, in row groups as write_row_groups writes them."""
    write_row_groups(path, table.schema, [table])


@dataclass(frozen=True)
class TokenizedExample:
    """An example's tokens as mix writes them and pack lays them out (or a piece of one that fits a row)."""

    input_ids: list[int]
    labels: list[int]
    user_starts: list[int]

    def cut(self, start: int, end: int) -> TokenizedExample:
        starts = [index - start for index in self.user_starts if start <= index < end]
        return TokenizedExample(self.input_ids[start:end], self.labels[start:end], starts)


def read_parquet(path: Path, columns: list[str] | None = None, rerun: str = "") -> pa.Table:
    """A stage's input table; a missing, truncated or corrupt file is a clear error naming it, not a traceback."""
    hint = f"; rerun {rerun}" if rerun else ""
    try:
        table = pq.read_table(path, columns=columns, page_checksum_verification=True)
    except FileNotFoundError:
        raise click.ClickException(f"{path}: missing{hint or '; run the stage that writes it (dvc repro)'}") from None
    except (pa.ArrowException, OSError) as error:
        raise click.ClickException(f"{path}: not a readable Parquet file ({error}){hint}") from None
    return table


def bos_token_id(schema: pa.Schema) -> int | None:
    value = (schema.metadata or {}).get(BOS_METADATA_KEY)
    return int(value) if value is not None else None
