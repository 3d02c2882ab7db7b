"""Where mix keeps its tokenized examples between tokenizing them and writing the chosen ones: one scratch file that
the examples are appended to as they are tokenized, each example's tokens and text side by side, and that is read
back by position, one read per example. mix's memory then holds only where each example lies, and the rows of the
row group being written, however many examples it reads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from friction.schemas import TokenizedExample

TOKEN = np.dtype(np.int32)


class TokenArrays(NamedTuple):
    """One example's tokens as numpy arrays (int32)."""

    input_ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where nothing is trained
    user_starts: np.ndarray  # the token index of every user turn's header


class Stored(NamedTuple):
    """Where an example lies in a TokenStore, and its sizes: input_ids, labels and user_starts as int32, then the
    text's UTF-8 bytes."""

    offset: int  # bytes into the store's file
    length: int  # tokens
    user_starts: int
    text_bytes: int

    @property
    def size(self) -> int:
        return TOKEN.itemsize * (2 * self.length + self.user_starts) + self.text_bytes


class TokenStore:
    """An append-only scratch file of tokenized examples, deleted when the store is closed; `directory` None puts it
    in the system's temporary directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.file = tempfile.TemporaryFile(prefix=".friction-tokens-", dir=directory)
        self.end = 0

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.file.close()

    def add(self, texts: Sequence[str], tokens: Sequence[TokenArrays | TokenizedExample]) -> list[Stored]:
        stored, parts = [], []
        for text, example in zip(texts, tokens, strict=True):
            encoded = text.encode("utf-8")
            arrays = [
                np.asarray(values, dtype=TOKEN) for values in (example.input_ids, example.labels, example.user_starts)
            ]
            stored.append(Stored(self.end, len(arrays[0]), len(arrays[2]), len(encoded)))
            parts += [*(array.tobytes() for array in arrays), encoded]
            self.end += stored[-1].size
        self.file.write(b"".join(parts))
        return stored

    def columns(self, rows: Sequence[Stored]) -> dict[str, pa.Array]:
        """`rows`' texts and tokens in that order, as Arrow columns (string; lists of int32), each one contiguous
        array. Reads each row once, in the file's order."""
        self.file.flush()
        sizes = {
            "text": np.fromiter((row.text_bytes for row in rows), dtype=np.int64, count=len(rows)),
            "input_ids": np.fromiter((row.length for row in rows), dtype=np.int64, count=len(rows)),
            "user_starts": np.fromiter((row.user_starts for row in rows), dtype=np.int64, count=len(rows)),
        }
        sizes["labels"] = sizes["input_ids"]
        offsets = {name: np.concatenate([[0], np.cumsum(size)]).astype(np.int64) for name, size in sizes.items()}
        text = np.empty(int(offsets["text"][-1]), dtype=np.uint8)
        tokens = {
            name: np.empty(int(offsets[name][-1]), dtype=TOKEN) for name in ("input_ids", "labels", "user_starts")
        }
        descriptor = self.file.fileno()
        for index in sorted(range(len(rows)), key=lambda i: rows[i].offset):
            row = rows[index]
            record = os.pread(descriptor, row.size, row.offset)
            values = np.frombuffer(record, dtype=TOKEN, count=2 * row.length + row.user_starts)
            ids_at, starts_at, text_at = (offsets[name][index] for name in ("input_ids", "user_starts", "text"))
            tokens["input_ids"][ids_at : ids_at + row.length] = values[: row.length]
            tokens["labels"][ids_at : ids_at + row.length] = values[row.length : 2 * row.length]
            tokens["user_starts"][starts_at : starts_at + row.user_starts] = values[2 * row.length :]
            text[text_at : text_at + row.text_bytes] = np.frombuffer(record, dtype=np.uint8, offset=values.nbytes)
        columns: dict[str, pa.Array] = {
            "text": pa.StringArray.from_buffers(
                len(rows), pa.py_buffer(offsets["text"].astype(np.int32)), pa.py_buffer(text)
            )
        }
        for name, values in tokens.items():
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets[name], type=pa.int32()), pa.array(values))
        return columns
