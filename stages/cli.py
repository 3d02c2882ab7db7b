"""`friction`: one subcommand per DVC stage (what dvc.yaml runs), plus the demo's base model and the scorer.

Each stage validates params.yaml before any heavy import or work, and its default paths are the ones dvc.yaml
declares for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stages.config import load_params

MANIFEST = Path("data/raw/manifest.json")
METRICS = Path("metrics")
ADAPTER = Path("models/adapter")


def path_option(name: str, default: str, help_text: str):
    return click.option(name, type=click.Path(path_type=Path), default=default, show_default=True, help=help_text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Reproduce and iterate on the mixture-of-friction LoRA fine-tune."""


@main.command()
@path_option("--out", "data/raw", "Fetched sources and manifest.json.")
def fetch(out: Path) -> None:
    """Download or copy every data source and pin the base model."""
    params = load_params()
    from stages import fetch as stage

    stage.run(params, out)


@main.command()
@path_option("--raw", "data/raw", "Output of fetch.")
@path_option("--out", "data/mixed", "train.jsonl, validation.jsonl and dropped.jsonl.")
@path_option("--metrics", str(METRICS / "mix.json"), "Per-source counts.")
def mix(raw: Path, out: Path, metrics: Path) -> None:
    """Normalise, clean, sample and split the examples."""
    params = load_params()
    from stages import mix as stage

    stage.run(params, raw, out, metrics)


@main.command()
@path_option("--mixed", "data/mixed", "Output of mix.")
@path_option("--manifest", str(MANIFEST), "Names the base model whose tokenizer is used.")
@path_option("--out", "data/packed", "train.parquet and validation.parquet.")
@path_option("--metrics", str(METRICS / "pack.json"), "Rows, tokens and fill ratio.")
def pack(mixed: Path, manifest: Path, out: Path, metrics: Path) -> None:
    """Tokenize, mask all but the assistant turns, pack into rows."""
    params = load_params()
    from stages import pack as stage

    stage.run(params, mixed, manifest, out, metrics)


@main.command()
@path_option("--packed", "data/packed", "Output of pack.")
@path_option("--manifest", str(MANIFEST), "Names the base model.")
@path_option("--adapter", str(ADAPTER), "Where the PEFT adapter and tokenizer go.")
@path_option("--checkpoints", "models/checkpoints", "Resumable checkpoints (persisted across runs).")
@path_option("--live", "dvclive", "dvclive logs and plots.")
@path_option("--metrics", str(METRICS / "train.json"), "Training summary.")
def train(packed: Path, manifest: Path, adapter: Path, checkpoints: Path, live: Path, metrics: Path) -> None:
    """Train the LoRA adapter."""
    params = load_params()
    from stages import train as stage

    stage.run(params, packed, manifest, adapter, checkpoints, live, metrics)


@main.command()
@path_option("--packed", "data/packed", "Output of pack (validation rows).")
@path_option("--manifest", str(MANIFEST), "Names the base model.")
@path_option("--adapter", str(ADAPTER), "Output of train.")
@path_option("--prompts", "data/eval/prompts.jsonl", "Held-out prompts, one JSON object with 'prompt' a line.")
@path_option("--samples", "data/eval/samples.jsonl", "Both models' responses with their metrics.")
@path_option("--metrics", str(METRICS / "evaluate.json"), "Validation loss and friction metrics.")
def evaluate(packed: Path, manifest: Path, adapter: Path, prompts: Path, samples: Path, metrics: Path) -> None:
    """Compare the base model with base + adapter."""
    params = load_params()
    from stages import evaluate as stage

    stage.run(params, packed, manifest, adapter, prompts, samples, metrics)


@main.command()
@path_option("--metrics-dir", str(METRICS), "Metrics of mix, pack, train and evaluate.")
@path_option("--manifest", str(MANIFEST), "Output of fetch.")
@path_option("--adapter", str(ADAPTER), "The adapter the card describes.")
@path_option("--live", "dvclive", "dvclive logs of train (loss curves).")
@path_option("--out", str(ADAPTER / "README.md"), "The model card; the loss plot goes beside it.")
def card(metrics_dir: Path, manifest: Path, adapter: Path, live: Path, out: Path) -> None:
    """Write the adapter's model card."""
    params = load_params()
    from stages import card as stage

    stage.run(params, metrics_dir, manifest, adapter, live, out)


@main.command("demo-base")
@path_option("--out", "data/sources/demo-base", "Where the tiny model goes.")
@click.option("--vocab-size", default=3000, show_default=True, help="BPE vocabulary size.")
def demo_base(out: Path, vocab_size: int) -> None:
    """Build the demo's tiny Qwen2 base model, its tokenizer trained on the bundled sample data."""
    from stages.artifacts import atomic_output
    from stages.tiny_model import build_tiny_model, corpus_from_jsonl

    corpus = sorted(Path("data/sources/demo").glob("*.jsonl")) + [Path("data/eval/prompts.jsonl")]
    with atomic_output(out) as scratch:
        build_tiny_model(corpus_from_jsonl(corpus), scratch, vocab_size=vocab_size)
    click.echo(f"demo-base: {out}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def score(files: tuple[Path, ...]) -> None:
    """Friction metrics of every *_response field in JSON or JSON Lines FILES."""
    from stages import friction_metrics

    for path in files:
        try:
            summary = friction_metrics.score_records(friction_metrics.load_records(path))
        except ValueError as error:
            raise click.ClickException(str(error)) from None
        click.echo(json.dumps({str(path): summary}, indent=2))
