"""Where mix keeps its tokenized examples between tokenizing them and writing the chosen ones: flat numpy arrays a batch
at a time, on disk (a scratch directory) so that mix's memory does not grow with everything it has read, and read
back in one sequential pass over the batches into the columns of a split, in any order."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from stages.schemas import TokenizedExample


class TokenArrays(NamedTuple):
    """One example's tokens as numpy arrays (int32)."""

    input_ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where nothing is trained
    user_starts: np.ndarray  # the token index of every user turn's header


class Stored(NamedTuple):
    """Where an example waits in a TokenStore, and its sizes."""

    batch: int
    position: int
    length: int  # tokens
    text_bytes: int
    user_starts: int


ARRAYS = ("text", "input_ids", "labels", "user_starts")


def flat(parts: Sequence[np.ndarray], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(part) for part in parts], out=offsets[1:])
    values = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
    return values, offsets


class TokenStore:
    """Batches of (text, tokens); `directory` None keeps them in memory (small inputs, tests)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.batches: list[dict[str, np.ndarray]] = []  # in memory only
        self.count = 0

    def add(self, texts: Sequence[str], tokens: Sequence[TokenArrays | TokenizedExample]) -> list[Stored]:
        encoded = [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]
        arrays = {}
        for name, parts in (
            ("text", encoded),
            ("input_ids", [np.asarray(t.input_ids, dtype=np.int32) for t in tokens]),
            ("labels", [np.asarray(t.labels, dtype=np.int32) for t in tokens]),
            ("user_starts", [np.asarray(t.user_starts, dtype=np.int32) for t in tokens]),
        ):
            arrays[name], arrays[f"{name}_offsets"] = flat(parts, np.uint8 if name == "text" else np.int32)
        batch = self.count
        self.count += 1
        if self.directory is None:
            self.batches.append(arrays)
        else:
            np.savez(self.directory / f"{batch}.npz", **arrays)
        return [
            Stored(batch, position, len(t.input_ids), len(text), len(t.user_starts))
            for position, (text, t) in enumerate(zip(encoded, tokens, strict=True))
        ]

    def load(self, batch: int) -> dict[str, np.ndarray]:
        if self.directory is None:
            return self.batches[batch]
        with np.load(self.directory / f"{batch}.npz") as data:
            return {name: data[name] for name in data.files}

    def columns(self, rows: Sequence[Stored]) -> dict[str, pa.Array]:
        """`rows`' texts and tokens in that order, as Arrow columns (string; lists of int32), each one contiguous
        array, reading every batch it needs once."""
        sizes = {"text": "text_bytes", "input_ids": "length", "labels": "length", "user_starts": "user_starts"}
        offsets = {name: np.zeros(len(rows) + 1, dtype=np.int64) for name in ARRAYS}
        for name, size in sizes.items():
            np.cumsum([getattr(row, size) for row in rows], out=offsets[name][1:])
        values = {name: np.empty(int(offsets[name][-1]), dtype=np.uint8 if name == "text" else np.int32)
                  for name in ARRAYS}  # fmt: skip
        wanted: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for index, row in enumerate(rows):
            wanted[row.batch].append((index, row.position))
        for batch in sorted(wanted):
            data = self.load(batch)
            for name in ARRAYS:
                source, source_offsets = data[name], data[f"{name}_offsets"]
                target, target_offsets = values[name], offsets[name]
                for index, position in wanted[batch]:
                    target[target_offsets[index] : target_offsets[index + 1]] = source[
                        source_offsets[position] : source_offsets[position + 1]
                    ]
        text_offsets = pa.py_buffer(offsets["text"].astype(np.int32))
        columns: dict[str, pa.Array] = {
            "text": pa.StringArray.from_buffers(len(rows), text_offsets, pa.py_buffer(values["text"]))
        }
        for name in ARRAYS[1:]:
            columns[name] = pa.ListArray.from_arrays(
                pa.array(offsets[name], type=pa.int32()), pa.array(values[name], type=pa.int32())
            )
        return columns
