"""`friction`: one subcommand per DVC stage (what dvc.yaml runs), plus the demo's base model, the scorer, `pin`,
the DVC remote and releases (`remote`, `pull`, `release`) and the published adapter in hand (`chat`, `merge`, `push`).

Each stage validates params.yaml before any heavy import or work. Stages take every path as a required option:
dvc.yaml's `cmd:` lines are the one place that names them (`stages.pipeline.stage_argv` reads them for tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stages.config import load_params


def path_option(name: str, help_text: str):
    return click.option(name, type=click.Path(path_type=Path), required=True, help=help_text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Reproduce and iterate on the mixture-of-friction LoRA fine-tune."""


@main.command()
@path_option("--out", "Fetched sources and manifest.json.")
def fetch(out: Path) -> None:
    """Download or copy every data source and pin the base model."""
    params = load_params()
    from stages import fetch as stage

    stage.run(params, out)


@main.command()
@path_option("--raw", "Output of fetch.")
@path_option("--manifest", "Names the base model whose tokenizer is used.")
@path_option("--out", "train.parquet, validation.parquet and dropped.jsonl.")
@path_option("--metrics", "Per-source counts of rows and tokens.")
def mix(raw: Path, manifest: Path, out: Path, metrics: Path) -> None:
    """Normalise, clean, tokenize, sample and split the examples."""
    params = load_params()
    from stages import mix as stage

    stage.run(params, raw, manifest, out, metrics)


@main.command()
@path_option("--mixed", "Output of mix (token ids and labels).")
@path_option("--out", "train.parquet and validation.parquet.")
@path_option("--metrics", "Rows, tokens and fill ratio.")
def pack(mixed: Path, out: Path, metrics: Path) -> None:
    """Cut over-length examples and pack the token ids into rows."""
    params = load_params()
    from stages import pack as stage

    stage.run(params, mixed, out, metrics)


@main.command()
@path_option("--packed", "Output of pack.")
@path_option("--manifest", "Names the base model.")
@path_option("--adapter", "Where the PEFT adapter and tokenizer go.")
@path_option("--checkpoints", "Resumable checkpoints (persisted across runs).")
@path_option("--live", "dvclive logs and plots.")
@path_option("--metrics", "Training summary.")
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
@path_option("--packed", "Output of pack (validation rows).")
@path_option("--manifest", "Names the base model.")
@path_option("--adapter", "Output of train.")
@path_option("--prompts", "Held-out prompts, one JSON object with 'prompt' a line.")
@path_option("--samples", "Both models' responses with their metrics.")
@path_option("--metrics", "Validation loss and friction metrics.")
def evaluate(packed: Path, manifest: Path, adapter: Path, prompts: Path, samples: Path, metrics: Path) -> None:
    """Compare the base model with base + adapter."""
    params = load_params()
    from stages import evaluate as stage

    stage.run(params, packed, manifest, adapter, prompts, samples, metrics)


@main.command()
@path_option("--metrics-dir", "Metrics of mix, pack, train and evaluate.")
@path_option("--manifest", "Output of fetch.")
@path_option("--adapter", "Output of train: the adapter and its tokenizer.")
@path_option("--live", "dvclive logs of train (loss curves).")
@path_option("--out", "The publishable model folder: the adapter, its tokenizer, README.md (the card), the loss plot.")
def card(metrics_dir: Path, manifest: Path, adapter: Path, live: Path, out: Path) -> None:
    """Write the publishable model folder: the trained adapter with its model card and loss curves."""
    params = load_params()
    from stages import card as stage

    stage.run(params, metrics_dir, manifest, adapter, live, out)


@main.command()
@path_option("--adapter", "Output of card: the published adapter folder.")
@path_option("--manifest", "Output of fetch: names the base model, whose vocabulary the engines use.")
@path_option("--out", "The GGUF LoRA, the Ollama Modelfile, a llama.cpp chat template and README.md.")
def export(adapter: Path, manifest: Path, out: Path) -> None:
    """Write the adapter for llama.cpp, Ollama and vLLM: GGUF LoRA, Modelfile (template checked against the training
    ids), commands; refuse an adapter those engines cannot load, saying why."""
    params = load_params()
    from stages import export as stage

    stage.run(params, adapter, manifest, out)


@main.command("demo-base")
@path_option("--out", "Where the tiny model goes (recipes/demo.yaml's model.base).")
@click.option("--vocab-size", default=3000, show_default=True, help="BPE vocabulary size.")
def demo_base(out: Path, vocab_size: int) -> None:
    """Build the demo's tiny Qwen2 base model, its tokenizer trained on the bundled sample data."""
    from stages.artifacts import atomic_output
    from stages.tiny_model import build_tiny_model, corpus_from_jsonl

    corpus = sorted(Path("data/sources/demo").glob("*.jsonl")) + [Path("data/eval/prompts.jsonl")]  # make demo's
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


@main.command()
@click.argument("url", required=False)
@click.option("--local", is_flag=True, help="Write .dvc/config.local (this clone only) instead of .dvc/config.")
@click.option("--if-unset", is_flag=True, help="Leave an existing remote as it is (make setup's one-machine default).")
def remote(url: str | None, local: bool, if_unset: bool) -> None:
    """Show the DVC remote, or make URL the one every clone and experiment uses (make remote URL=...).

    URL is a folder (written absolute: a relative one resolves differently per clone and under `dvc exp push`),
    or s3://, gs://, ssh://, azure://... (each needs its DVC plugin, e.g. pip install 'dvc[s3]').
    """
    from stages import remote as stage

    existing = stage.current()
    if url is None or (if_unset and existing is not None):
        click.echo(stage.describe(existing))
        return
    install = stage.missing_plugin(url)  # first: an unknown scheme stops here
    kept = stage.set_remote(url, local)
    scope = ".dvc/config.local (this clone only)" if local else ".dvc/config: commit it so every clone uses it"
    click.echo(f"DVC remote {stage.NAME!r} -> {kept}, in {scope}")
    if install is not None:
        click.echo(f"warning: DVC cannot reach {kept} until its plugin is installed: {install}", err=True)


@main.command()
@click.argument("targets", nargs=-1)
def pull(targets: tuple[str, ...]) -> None:
    """`dvc pull [TARGETS]`, naming the remote it looked in and how to set it when something is not there."""
    from stages import remote as stage

    stage.pull(targets)


@main.command()
@click.argument("version")
def release(version: str) -> None:
    """Tag VERSION (vX.Y.Z) of the model artifact with gto: refused for a dirty workspace or an unpushed artifact."""
    from stages import release as stage

    stage.run(version)


def adapter_options(command):
    """--adapter DIR or --rev REV: which published adapter folder (default: the workspace's, dvc.yaml's artifact)."""
    command = click.option(
        "--rev", help="A version (v1.0.0), commit, branch, tag or experiment: its artifact, from DVC's cache or remote."
    )(command)
    return click.option(
        "--adapter", type=click.Path(file_okay=False, path_type=Path),
        help="An adapter folder (default: the artifact folder dvc.yaml names, models/friction-adapter).",
    )(command)  # fmt: skip


@main.command()
@adapter_options
@click.argument("prompt", required=False)
@click.option("--system", help="The system turn (default: params.yaml's mix.system_prompt, what training used).")
@click.option("--max-new-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.6, show_default=True, type=click.FloatRange(min=0), help="0: greedy.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling, for a reply you can get again.")
def chat(
    adapter: Path | None, rev: str | None, prompt: str | None, system: str | None, max_new_tokens: int,
    temperature: float, top_p: float, seed: int | None,
) -> None:  # fmt: skip
    """Talk to base + adapter in ChatML as trained: one reply to PROMPT, or a conversation without one."""
    if system is None and Path("params.yaml").is_file():
        system = load_params().mix.system_prompt
    from transformers import set_seed

    from stages import chat as stage
    from stages.adapter import adapter_folder, load_base, with_adapter

    if seed is not None:
        set_seed(seed)
    with adapter_folder(adapter, rev) as folder:
        model, tokenizer = with_adapter(load_base(folder), folder)
        config = stage.generation_config(folder, tokenizer, max_new_tokens, temperature, top_p)
        stage.run(model, tokenizer, folder, prompt, system, config)


@main.command()
@adapter_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the merged model.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Default: the base's own (bf16 if 4-bit).")
def merge(adapter: Path | None, rev: str | None, out: Path, dtype: str | None) -> None:
    """Merge the adapter into its base (peft merge_and_unload): safetensors that transformers loads alone."""
    from stages import merge as stage
    from stages.adapter import adapter_folder

    with adapter_folder(adapter, rev) as folder:
        stage.run(folder, out, dtype)


@main.command()
@adapter_options
@click.option("--repo-id", required=True, help="The Hugging Face model repository, USER/NAME or ORG/NAME.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--dry-run", is_flag=True, help="List the files and the target; send nothing.")
@click.option("--message", default="Upload the friction adapter", show_default=True, help="The Hub commit message.")
def push(adapter: Path | None, rev: str | None, repo_id: str, private: bool, dry_run: bool, message: str) -> None:
    """Upload the adapter folder (weights, tokenizer, card, loss plot) to the Hugging Face Hub.

    The token comes from HF_TOKEN or `hf auth login` (huggingface_hub's own lookup) and is never printed."""
    from stages import publish as stage
    from stages.adapter import adapter_folder

    with adapter_folder(adapter, rev) as folder:
        stage.run(folder, repo_id, private, dry_run, message)
