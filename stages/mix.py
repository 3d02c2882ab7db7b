"""mix: every source row as one conversation, tokenized once; the mixture sampled and split into train and validation.

What each step does and the rules it follows: docs/pipeline.md (Template and tokens, Mixing, Dirty rows).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import click
from transformers import PreTrainedTokenizerBase

from friction import environment
from friction.artifacts import atomic_output, read_json, write_json
from friction.config import Params, load_params
from friction.mixing import (
    Encoded,
    added_bos_id,
    base_tokenizer,
    drop_over_length,
    echo_report,
    encode,
    sample,
    stop_on_bad_rows,
    stop_on_empty_sources,
    train_validation_split,
    within_reach,
    write_parquet,
)
from friction.pipeline import path_option
from friction.source_rows import (
    read_source,
    unique,
)
from friction.token_store import TokenStore


def run(params: Params, raw_dir: Path, manifest_path: Path, out_dir: Path, metrics_path: Path) -> None:
    fetched = read_json(manifest_path).get("sources", {})
    rows_in = {}
    for name in params.data.sources:
        if not isinstance(fetched.get(name), dict) or not isinstance(fetched[name].get("rows"), int):
            raise click.ClickException(f"{manifest_path} has no source {name!r} with its rows; rerun fetch")
        rows_in[name] = fetched[name]["rows"]
        if not (raw_dir / f"{name}.jsonl").is_file():
            raise click.ClickException(
                f"{raw_dir / f'{name}.jsonl'}: missing, though the fetch manifest lists source {name!r}; rerun fetch"
            )
    tokenizer, special = base_tokenizer(manifest_path)

    dropped: list[dict] = []
    duplicates: list[dict] = []
    examples = itertools.chain.from_iterable(
        read_source(raw_dir / f"{name}.jsonl", name, source.format, params.mix.system_prompt, dropped, special)
        for name, source in params.data.sources.items()
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The tokens wait on disk beside the output: memory holds where each example lies, not the examples read.
    with TokenStore(out_dir.parent) as store:
        examples = within_reach(unique(examples, duplicates), tokenizer, params, dropped)
        encoded = encode(examples, tokenizer, params, store)
        mix_and_write(params, encoded, dropped + duplicates, rows_in, tokenizer, store, out_dir, metrics_path)


def mix_and_write(
    params: Params,
    encoded: list[Encoded],
    dropped: list[dict],
    rows_in: dict[str, int],
    tokenizer: PreTrainedTokenizerBase,
    store: TokenStore,
    out_dir: Path,
    metrics_path: Path,
) -> None:
    max_length = params.model.max_length
    if params.pack.overflow == "drop":
        encoded = drop_over_length(encoded, max_length, dropped)
    if dropped and params.mix.on_bad_rows == "fail":
        stop_on_bad_rows(dropped, params)

    by_source = {name: [row for row in encoded if row.source == name] for name in params.data.sources}
    stop_on_empty_sources(by_source, dropped, params)
    mixed, report = sample(by_source, params)
    train, validation = train_validation_split(mixed, params.mix.validation_fraction, params.seed)

    for name, rows in by_source.items():
        reasons = Counter(d["reason"] for d in dropped if d["source"] == name)
        over_length = sum(row.length > max_length for row in rows)
        report["sources"][name].update(
            rows_in=rows_in[name], kept=len(rows), dropped=dict(sorted(reasons.items())), over_max_length=over_length
        )
        if rows_in[name] != len(rows) + sum(reasons.values()):
            raise AssertionError(f"mix lost rows of {name} without a reason")  # an internal bug, never user input
    weight_sum = round(sum(params.mix.weights.values()), 6)
    report.update(
        weights_sum=weight_sum,
        weights_sum_is_one=weight_sum == 1,
        capped_sources=sum(counts["capped"] for counts in report["sources"].values()),
        empty_sources=sum(counts["empty"] for counts in report["sources"].values()),
        train=len(train),
        validation=len(validation),
    )

    with atomic_output(out_dir) as scratch, atomic_output(metrics_path) as metrics_scratch:
        scratch.mkdir()
        bos = added_bos_id(tokenizer)
        write_parquet(train, store, scratch / "train.parquet", bos)
        write_parquet(validation, store, scratch / "validation.parquet", bos)
        with (scratch / "dropped.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in dropped)
        write_json(metrics_scratch, report)
    echo_report(report)


@click.command()
@path_option("--raw", "Output of fetch.")
@path_option("--manifest", "Names the base model whose tokenizer is used.")
@path_option("--out", "train.parquet, validation.parquet and dropped.jsonl.")
@path_option("--metrics", "Per-source counts of rows and tokens.")
def main(raw: Path, manifest: Path, out: Path, metrics: Path) -> None:
    """Normalise, clean, tokenize, sample and split the examples."""
    recorded = environment.record("mix")  # warns before the work when the environment is not the lock's
    run(load_params(), raw, manifest, out, metrics)
    environment.write_into(metrics, recorded)
