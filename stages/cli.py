"""`friction`: one subcommand per DVC stage (what dvc.yaml runs), plus the demo's base model, the scorer and `pin`.

Each stage validates params.yaml before any heavy import or work, and its default paths are the ones dvc.yaml
declares for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stages.artifacts import RAW_MANIFEST
from stages.config import load_params

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
@path_option("--manifest", str(RAW_MANIFEST), "Names the base model whose tokenizer is used.")
@path_option("--out", "data/mixed", "train.parquet, validation.parquet and dropped.jsonl.")
@path_option("--metrics", str(METRICS / "mix.json"), "Per-source counts of rows and tokens.")
def mix(raw: Path, manifest: Path, out: Path, metrics: Path) -> None:
    """Normalise, clean, tokenize, sample and split the examples."""
    params = load_params()
    from stages import mix as stage

    stage.run(params, raw, manifest, out, metrics)


@main.command()
@path_option("--mixed", "data/mixed", "Output of mix (token ids and labels).")
@path_option("--out", "data/packed", "train.parquet and validation.parquet.")
@path_option("--metrics", str(METRICS / "pack.json"), "Rows, tokens and fill ratio.")
def pack(mixed: Path, out: Path, metrics: Path) -> None:
    """Cut over-length examples and pack the token ids into rows."""
    params = load_params()
    from stages import pack as stage

    stage.run(params, mixed, out, metrics)


@main.command()
@path_option("--packed", "data/packed", "Output of pack.")
@path_option("--manifest", str(RAW_MANIFEST), "Names the base model.")
@path_option("--adapter", str(ADAPTER), "Where the PEFT adapter and tokenizer go.")
@path_option("--checkpoints", "models/checkpoints", "Resumable checkpoints (persisted across runs).")
@path_option("--live", "dvclive", "dvclive logs and plots.")
@path_option("--metrics", str(METRICS / "train.json"), "Training summary.")
def train(packed: Path, manifest: Path, adapter: Path, checkpoints: Path, live: Path, metrics: Path) -> None:
    """Train the LoRA adapter with the backend train.backend names (auto: unsloth on a CUDA GPU if installed)."""
    params = load_params()
    from stages import distributed

    distributed.launch(params.train.gpus)  # train.gpus > 1: restarts this command under torchrun
    from stages.modeling import resolve_backend

    backend = resolve_backend(params.train.backend)  # first: it imports unsloth, which must precede transformers
    from stages import train as stage

    stage.run(params, backend, packed, manifest, adapter, checkpoints, live, metrics)


@main.command()
@path_option("--packed", "data/packed", "Output of pack (validation rows).")
@path_option("--manifest", str(RAW_MANIFEST), "Names the base model.")
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
@path_option("--manifest", str(RAW_MANIFEST), "Output of fetch.")
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
        build_tiny_model(corpus_from_jsonl(corpus), scratch, tokenizer_vocab_size=vocab_size)
    click.echo(f"demo-base: {out}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def score(files: tuple[Path, ...]) -> None:
    """Friction metrics of every *_response field in JSON or JSON Lines FILES, as one JSON object keyed by file.

    E.g. data/eval/samples.jsonl (what evaluate wrote), or any file of objects with *_response string fields.
    """
    from stages import friction_metrics

    summaries = {}
    for path in files:
        try:
            records = friction_metrics.load_records(path)
        except UnicodeDecodeError as error:
            raise click.ClickException(f"{path}: not UTF-8 text (byte {error.start})") from None
        except ValueError as error:  # its message names the file and the line
            raise click.ClickException(str(error)) from None
        try:
            summaries[str(path)] = friction_metrics.score_records(records)
        except ValueError as error:
            raise click.ClickException(f"{path}: {error}") from None
    click.echo(json.dumps(summaries, indent=2))


@main.command()
def pin() -> None:
    """Replace each Hub revision in params.yaml that is a branch or tag by the commit it names now.

    Asks the Hub, or with HF_HUB_OFFLINE=1 the local Hugging Face cache. Comments and layout are kept.
    """
    params = load_params()
    from stages import pin as stage

    stage.run(params)
