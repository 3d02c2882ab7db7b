"""pack: lay the examples mix tokenized into rows of at most model.max_length tokens. pack never tokenizes.

It reads `input_ids`, `labels` and `user_starts` of every example from data/mixed/*.parquet and writes rows of
`input_ids`, `labels` (-100 where nothing is trained) and `seq_lengths`, TRL's padding-free format. Tokens stay in
flat numpy arrays from read to write (`TokenColumns`), a few bytes a token instead of a Python object each, and
best-fit-decreasing finds a row in O(log max_length), so a million examples pack in seconds.

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

from pathlib import Path

import click

from friction import environment
from friction.artifacts import atomic_output, write_json
from friction.config import Params, load_params
from friction.packing import plan, read_split, write_rows
from friction.pipeline import path_option


def run(params: Params, mixed_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    report = {"strategy": params.pack.strategy, "overflow": params.pack.overflow, "max_length": params.model.max_length}
    with atomic_output(out_dir) as scratch, atomic_output(metrics_path) as metrics_scratch:
        scratch.mkdir()
        for split in ("train", "validation"):
            examples, bos = read_split(mixed_dir / f"{split}.parquet", params)
            layout = plan(examples, params, bos)
            if not len(layout):
                raise click.ClickException(
                    f"pack: no {split} rows left: none of its {len(examples)} examples keeps a labelled token "
                    f"within model.max_length {params.model.max_length}; see pack.overflow"
                )
            trained = write_rows(layout, scratch / f"{split}.parquet")
            counts = report[split] = layout.metrics(trained, params.model.max_length)
            del examples, layout
            click.echo(
                f"pack: {split}: {counts['packed_examples']} examples -> {counts['rows']} rows, "
                f"fill {counts['fill_ratio']:.1%}, {counts['truncated']} truncated, {counts['split']} split into "
                f"{counts['split_pieces']} pieces, {counts['dropped_without_labels']} dropped without labels"
            )
        write_json(metrics_scratch, report)


@click.command()
@path_option("--mixed", "Output of mix (token ids and labels).")
@path_option("--out", "train.parquet and validation.parquet.")
@path_option("--metrics", "Rows, tokens and fill ratio.")
def main(mixed: Path, out: Path, metrics: Path) -> None:
    """Cut over-length examples and pack the token ids into rows."""
    recorded = environment.record("pack")  # warns before the work when the environment is not the lock's
    run(load_params(), mixed, out, metrics)
    environment.write_into(metrics, recorded)
