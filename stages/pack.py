"""pack: lay the examples mix tokenized into rows of at most model.max_length tokens. pack never tokenizes.

It reads `input_ids`, `labels` and `user_starts` of every example from data/mixed/*.parquet and writes rows of
`input_ids`, `labels` (-100 where nothing is trained) and `seq_lengths`, TRL's padding-free format.

Over-length examples, `pack.overflow`:
- truncate: keep the first max_length tokens.
- split: cut into consecutive max_length pieces (the last one shorter), each its own example: a later piece does not
  see the earlier ones.
- drop: mix has dropped them already, as dirty rows; data that still holds one stops the stage (rerun mix).
An example or piece left without a labelled token is dropped and counted (`dropped_without_labels`): it has
nothing to learn from.

Layout and masking, `pack.strategy`:
- bfd (default): best-fit-decreasing. `seq_lengths` lists every example of a row, so with positions reset per
  example each one attends only to itself; labels are the assistant turns with their closing <|im_end|>.
- stacked: the original's "stacking" (original-recipe.md sections 4-5). Greedy next-fit in mixed order, one sequence
  per row (`seq_lengths` = [row length]): examples attend to each other and positions run on across them. The
  original tokenized each stacked row as one text, so a row starts with the tokenizer's BOS and its examples carry
  none of their own (mix records the BOS id in its files' metadata; bfd keeps each example's own). Labels
  follow the original's masking (Unsloth's train_on_responses_only with response part "<|im_start|>assistant\\n"
  and instruction part "<|im_start|>user\\n"): a labelled run opens at each assistant turn's content and closes at
  the next user turn's header in the row, or at the row's end; a row starts with no run open. Besides the assistant
  turns this trains the newline after each <|im_end|> and, because the run opened by one example's last assistant
  turn only closes at the next example's first user turn, the system turn of every example after the first in a row.

metrics/pack.json, per split: examples (read), truncated, split (examples cut into pieces), split_pieces (the pieces
they became), dropped_without_labels, packed_examples (= examples - split + split_pieces - dropped_without_labels),
rows, real_tokens, trained_tokens (labels that are not -100), padded_slots (rows x max_length - real_tokens),
fill_ratio (real_tokens / (rows x max_length)).
"""

from __future__ import annotations

import bisect
from collections import Counter
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from stages.artifacts import atomic_output, write_json
from stages.chatml import IGNORE_INDEX
from stages.config import Params
from stages.schemas import PACKED_SCHEMA, TokenizedExample, bos_token_id, read_parquet, write_parquet

MIXED_COLUMNS = ["id", "input_ids", "labels", "user_starts"]
# An example, or the part of one that fits a row.
Piece = TokenizedExample


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin indices of `lengths` into rows of at most `capacity` tokens, longest first, each into the fullest row
    that still has room."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            space, row = capacity - lengths[index], len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            space -= lengths[index]
        bisect.insort(free, (space, row))
    return rows


def next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
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


def fit(examples: list[Piece], capacity: int, overflow: str) -> tuple[list[Piece], Counter[str]]:
    """Cut over-length examples as `overflow` says; drop what has no label left. Returns the pieces and counts."""
    pieces: list[Piece] = []
    counts: Counter[str] = Counter(truncated=0, split=0, split_pieces=0, dropped_without_labels=0)
    for example in examples:
        length = len(example.input_ids)
        if length > capacity and overflow == "split":
            cuts = [example.cut(start, start + capacity) for start in range(0, length, capacity)]
            counts.update(split=1, split_pieces=len(cuts))
        elif length > capacity:  # truncate: under drop, mix left no over-length example and read_split refuses one
            cuts = [example.cut(0, capacity)]
            counts["truncated"] += cuts[0].trained  # an example cut and then dropped is counted once, as dropped
        else:
            cuts = [example]
        kept = [piece for piece in cuts if piece.trained]
        counts["dropped_without_labels"] += len(cuts) - len(kept)
        pieces += kept
    return pieces, counts


def stacked_labels(stack: list[Piece]) -> list[int]:
    """The original's labels over one stacked row: each run from an assistant turn to the next user turn."""
    labels: list[int] = []
    in_response = False
    for piece in stack:
        user_starts = set(piece.user_starts)
        for index, (token, label) in enumerate(zip(piece.input_ids, piece.labels, strict=True)):
            if index in user_starts:
                in_response = False
            if label != IGNORE_INDEX:
                in_response = True
            labels.append(token if in_response else IGNORE_INDEX)
    return labels


def without_bos(example: Piece, bos: int) -> Piece:
    if not example.input_ids or example.input_ids[0] != bos:
        return example
    return example.cut(1, len(example.input_ids))


def pack_split(
    examples: list[Piece], params: Params, bos: int | None = None
) -> tuple[dict[str, list[list[int]]], dict]:
    """Rows of `examples`, and their counts. `bos`: the BOS id the tokenizer put before every example, if any."""
    capacity = params.model.max_length
    stacked = params.pack.strategy == "stacked"
    row_bos = [bos] if stacked and bos is not None else []  # stacked: one BOS a row, as the original tokenized it
    if row_bos:
        examples = [without_bos(example, bos) for example in examples]
    pieces, counts = fit(examples, capacity - len(row_bos), params.pack.overflow)
    lengths = [len(piece.input_ids) for piece in pieces]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for members in (next_fit if stacked else best_fit_decreasing)(lengths, capacity - len(row_bos)):
        row = [pieces[m] for m in members]
        rows["input_ids"].append(row_bos + [token for piece in row for token in piece.input_ids])
        if stacked:
            rows["labels"].append([IGNORE_INDEX] * len(row_bos) + stacked_labels(row))
            rows["seq_lengths"].append([len(row_bos) + sum(lengths[m] for m in members)])
        else:
            rows["labels"].append([label for piece in row for label in piece.labels])
            rows["seq_lengths"].append([lengths[m] for m in members])

    real_tokens = sum(len(ids) for ids in rows["input_ids"])
    slots = len(rows["input_ids"]) * capacity
    metrics = {
        "examples": len(examples),
        **counts,
        "packed_examples": len(pieces),
        "rows": len(rows["input_ids"]),
        "real_tokens": real_tokens,
        "trained_tokens": sum(label != IGNORE_INDEX for labels in rows["labels"] for label in labels),
        "padded_slots": slots - real_tokens,
        "fill_ratio": round(real_tokens / slots, 4) if slots else 0.0,
    }
    return rows, metrics


def read_split(path: Path, params: Params) -> tuple[list[Piece], int | None]:
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
    columns = read_parquet(path, MIXED_COLUMNS, rerun="mix").to_pydict()
    capacity = params.model.max_length
    examples = []
    for index, (row_id, ids, labels, user_starts) in enumerate(zip(*(columns[name] for name in MIXED_COLUMNS))):
        where = f"{path} row {index} (id {row_id})"
        if len(ids) != len(labels):
            raise click.ClickException(f"{where}: {len(ids)} input_ids but {len(labels)} labels; rerun mix")
        if params.pack.overflow == "drop" and len(ids) > capacity:
            raise click.ClickException(
                f"{where}: {len(ids)} tokens, over model.max_length {capacity} under pack.overflow: drop; "
                "rerun mix, which drops such rows"
            )
        examples.append(Piece(ids, labels, user_starts))
    return examples, bos_token_id(schema)


def run(params: Params, mixed_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    report = {"strategy": params.pack.strategy, "overflow": params.pack.overflow, "max_length": params.model.max_length}
    with atomic_output(out_dir) as scratch, atomic_output(metrics_path) as metrics_scratch:
        scratch.mkdir()
        for split in ("train", "validation"):
            examples, bos = read_split(mixed_dir / f"{split}.parquet", params)
            rows, counts = pack_split(examples, params, bos)
            if not rows["input_ids"]:
                raise click.ClickException(
                    f"pack: no {split} rows left: none of its {counts['examples']} examples keeps a labelled token "
                    f"within model.max_length {params.model.max_length}; see pack.overflow"
                )
            write_parquet(pa.Table.from_pydict(rows, schema=PACKED_SCHEMA), scratch / f"{split}.parquet")
            report[split] = counts
            click.echo(
                f"pack: {split}: {counts['packed_examples']} examples -> {counts['rows']} rows, "
                f"fill {counts['fill_ratio']:.1%}, {counts['truncated']} truncated, {counts['split']} split into "
                f"{counts['split_pieces']} pieces, {counts['dropped_without_labels']} dropped without labels"
            )
        write_json(metrics_scratch, report)
