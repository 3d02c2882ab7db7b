"""pack: tokenize once with the base model's tokenizer, label only the assistant turns, pack into rows.

Each packed row carries `input_ids`, `labels` (-100 outside assistant turns) and `seq_lengths`, TRL's padding-free
format: with `pack.strategy: bfd` every example keeps its own positions and attends only to itself; with
`stacked` (the original recipe) a row is one sequence and its examples attend to each other.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import click
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from stages.artifacts import atomic_output, base_model_reference, write_json
from stages.chatml import render
from stages.config import Params

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Tokenized:
    """Token ids of the rendered conversation, labelled where a token starts inside an assistant span."""
    text, spans = render(messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, _end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        trained = any(span_start <= start < span_end for span_start, span_end in spans)
        labels.append(token_id if trained else IGNORE_INDEX)
    return Tokenized(encoding["input_ids"], labels)


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


def pack_split(examples: list[dict], tokenizer: PreTrainedTokenizerBase, params: Params) -> tuple[Dataset, dict]:
    capacity = params.model.max_length
    kept: list[Tokenized] = []
    truncated = dropped = 0
    for example in examples:
        tokens = tokenize(example["messages"], tokenizer)
        overflows = len(tokens.input_ids) > capacity
        if overflows:
            if params.pack.overflow == "drop":
                dropped += 1
                continue
            tokens = Tokenized(tokens.input_ids[:capacity], tokens.labels[:capacity])
        if all(label == IGNORE_INDEX for label in tokens.labels):
            dropped += 1  # truncation cut the whole assistant turn: nothing left to learn from
            continue
        truncated += overflows  # counted once: an example cut and then dropped is only dropped
        kept.append(tokens)

    lengths = [len(t.input_ids) for t in kept]
    layout = best_fit_decreasing if params.pack.strategy == "bfd" else next_fit
    rows = {"input_ids": [], "labels": [], "seq_lengths": []}
    for members in layout(lengths, capacity):
        rows["input_ids"].append([i for m in members for i in kept[m].input_ids])
        rows["labels"].append([label for m in members for label in kept[m].labels])
        if params.pack.strategy == "bfd":
            rows["seq_lengths"].append([lengths[m] for m in members])
        else:
            rows["seq_lengths"].append([sum(lengths[m] for m in members)])

    real_tokens = sum(lengths)
    slots = len(rows["input_ids"]) * capacity
    metrics = {
        "examples": len(examples),
        "packed_examples": len(kept),
        "truncated": truncated,
        "dropped": dropped,
        "rows": len(rows["input_ids"]),
        "real_tokens": real_tokens,
        "trained_tokens": sum(label != IGNORE_INDEX for t in kept for label in t.labels),
        "padded_slots": slots - real_tokens,
        "fill_ratio": round(real_tokens / slots, 4) if slots else 0.0,
    }
    return Dataset.from_dict(rows), metrics


def read_examples(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run(params: Params, mixed_dir: Path, manifest_path: Path, out_dir: Path, metrics_path: Path) -> None:
    location, revision = base_model_reference(manifest_path)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    if not tokenizer.is_fast:
        raise click.ClickException(f"pack: the tokenizer of {location} has no fast version; offsets are needed")
    report = {"strategy": params.pack.strategy, "max_length": params.model.max_length}
    with atomic_output(out_dir) as scratch:
        scratch.mkdir()
        for split in ("train", "validation"):
            packed, report[split] = pack_split(read_examples(mixed_dir / f"{split}.jsonl"), tokenizer, params)
            if not len(packed):
                raise click.ClickException(f"pack: no {split} rows left; see {metrics_path} and pack.overflow")
            packed.to_parquet(scratch / f"{split}.parquet")
            click.echo(
                f"pack: {split}: {report[split]['packed_examples']} examples -> {report[split]['rows']} rows, "
                f"fill {report[split]['fill_ratio']:.1%}, {report[split]['truncated']} truncated"
            )
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics_path, report)
