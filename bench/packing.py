"""Packing: pack's `bfd` against the original's layout, and against TRL's own best-fit-decreasing, on the same examples.

- The original (original-recipe.md sections 4-5): next-fit stacking in mixed order, and every row padded to
  model.max_length by its collator. Ours: best-fit-decreasing, padding-free rows (each example attends to itself).
  Both are counted in row slots (rows x max_length): what a trainer pays for. Padded slots are the empty ones.
- TRL 1.16's `pack_dataset(dataset, max_length, "bfd")` on the same token ids: rows, fill and time, interleaved with
  pack's own `pack_columns`.

Inputs: the demo's mixed train split (the workspace of bench/pipeline.py, or any data/mixed), and a card-scale
synthetic corpus of token lengths like the real data (friction rows ~1.1-1.3k tokens, reluctance rows shorter),
6,000 examples at 4,096.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from trl.data_utils import pack_dataset

from bench.common import interleaved, ratio
from friction.chatml import IGNORE_INDEX
from friction.config import Params
from friction.packing import TokenColumns, pack_columns, read_split

CARD_EXAMPLES = 6000
CARD_MAX_LENGTH = 4096


def card_scale_examples(seed: int = 0) -> TokenColumns:
    """6,000 examples in the card mix's shares (friction 40 %, reluctance 60 %): friction rows of 1.1-1.3k tokens,
    reluctance rows of 250-600 (the demo's reluctance rows, written in the real schema, are ~1.3k characters: ~350
    tokens at the Qwen tokenizer's ~3.7 characters a token); the first fifth of each unlabelled (its system and user
    turns)."""
    rng = np.random.default_rng(seed)
    friction = rng.integers(1100, 1301, int(CARD_EXAMPLES * 0.4))
    reluctance = rng.integers(250, 601, CARD_EXAMPLES - len(friction))
    lengths = rng.permutation(np.concatenate([friction, reluctance]))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(10, 3000, int(offsets[-1])).astype(np.int32)
    position = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
    labels = np.where(position >= np.repeat(lengths // 5, lengths), ids, IGNORE_INDEX).astype(np.int32)
    user_start = np.zeros(len(ids), dtype=bool)
    user_start[offsets[:-1] + 8] = True
    return TokenColumns(ids, labels, offsets, user_start)


def with_strategy(params: Params, strategy: str, max_length: int) -> Params:
    return params.model_copy(
        update={
            "model": params.model.model_copy(update={"max_length": max_length}),
            "pack": params.pack.model_copy(update={"strategy": strategy}),
        }
    )


def layouts(examples: TokenColumns, params: Params, bos: int | None, max_length: int) -> dict[str, Any]:
    """Ours (bfd) and the original (stacked, padded to max_length) on the same examples: rows, fill, slots."""
    out = {}
    for name, strategy in (("ours_bfd", "bfd"), ("original_stacked", "stacked")):
        _, metrics = pack_columns(examples, with_strategy(params, strategy, max_length), bos)
        out[name] = {key: metrics[key] for key in ("rows", "real_tokens", "padded_slots", "fill_ratio")}
        out[name]["row_slots"] = metrics["rows"] * max_length
    out["original_over_ours_row_slots"] = out["original_stacked"]["row_slots"] / out["ours_bfd"]["row_slots"]
    out["original_over_ours_padded_slots"] = (
        out["original_stacked"]["padded_slots"] / out["ours_bfd"]["padded_slots"]
        if out["ours_bfd"]["padded_slots"]
        else None
    )
    return out


def against_trl(examples: TokenColumns, params: Params, max_length: int, runs: int) -> dict[str, Any]:
    """pack's bfd and TRL's pack_dataset(..., "bfd") on the same token ids, timed interleaved."""
    ids = [examples.ids[a:b] for a, b in zip(examples.offsets[:-1], examples.offsets[1:], strict=True)]
    dataset = Dataset.from_dict({"input_ids": [row.tolist() for row in ids]})
    bfd = with_strategy(params, "bfd", max_length)
    results: dict[str, Any] = {}

    def ours() -> float:
        start = time.perf_counter()
        _, metrics = pack_columns(examples, bfd)
        results["ours"] = {"rows": metrics["rows"], "fill_ratio": metrics["fill_ratio"]}
        return time.perf_counter() - start

    def trl() -> float:
        start = time.perf_counter()
        packed = pack_dataset(dataset, max_length, strategy="bfd", map_kwargs={"keep_in_memory": True})
        seconds = time.perf_counter() - start
        real = sum(len(row) for row in packed["input_ids"])
        results["trl"] = {"rows": len(packed), "fill_ratio": round(real / (len(packed) * max_length), 4)}
        return seconds

    timing = interleaved(runs, ours=ours, trl=trl)
    return {
        "seconds": timing,
        "trl_over_ours_seconds": ratio(timing["trl"], timing["ours"]),
        **{f"{name}_rows": value for name, value in results.items()},
    }


def run(params: Params, demo_mixed: Path, runs: int) -> dict[str, Any]:
    demo, bos = read_split(demo_mixed / "train.parquet", params)
    card = card_scale_examples()
    return {
        "demo": {
            "examples": len(demo),
            "max_length": params.model.max_length,
            **layouts(demo, params, bos, params.model.max_length),
            "against_trl": against_trl(demo, params, params.model.max_length, runs),
        },
        "card_scale": {
            "examples": len(card),
            "max_length": CARD_MAX_LENGTH,
            **layouts(card, params, bos, CARD_MAX_LENGTH),
            "against_trl": against_trl(card, params, CARD_MAX_LENGTH, runs),
        },
    }
