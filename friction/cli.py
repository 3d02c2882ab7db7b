"""`friction`: the user's commands: the demo's base model, the scorer, `pin`, the DVC remote and releases (`remote`,
`pull`, `release`) and the published adapter in hand (`chat`, `merge`, `push`). The DVC stages are `python -m stages`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from friction.config import load_params
from friction.pipeline import path_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Reproduce and iterate on the mixture-of-friction LoRA fine-tune."""


@main.command("demo-base")
@path_option("--out", "Where the tiny model goes (recipes/demo.yaml's model.base).")
@click.option("--vocab-size", default=3000, show_default=True, help="BPE vocabulary size.")
def demo_base(out: Path, vocab_size: int) -> None:
    """Build the demo's tiny Qwen2 base model, its tokenizer trained on the bundled sample data."""
    from friction.demo import build_demo_base

    build_demo_base(out, Path("."), vocab_size)
    click.echo(f"demo-base: {out}")


@main.command("demo-workspace")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def demo_workspace(folder: Path) -> None:
    """Make FOLDER what `make demo` runs in (replacing it): a git + DVC repository of this working tree with
    recipes/demo.yaml as params.yaml and the tiny base model tracked by DVC, committed."""
    from friction.demo import build_workspace

    build_workspace(folder, repository=True)
    click.echo(f"demo-workspace: {folder}")


def _records(path: Path) -> list[dict]:
    from friction import friction_metrics

    try:
        return friction_metrics.load_records(path)
    except UnicodeDecodeError as error:
        raise click.ClickException(f"{path}: not UTF-8 text (byte {error.start})") from None
    except ValueError as error:  # its message names the file and the line
        raise click.ClickException(str(error)) from None


def _response_field(path: Path, records: list[dict], asked: str | None) -> str:
    """The answer field of a file: the one asked for, else its only *_response field."""
    fields = [key for key in records[0] if key.endswith("_response")]
    if asked is not None:
        missing = next((index for index, record in enumerate(records) if not isinstance(record.get(asked), str)), None)
        if missing is not None:
            raise click.ClickException(f"{path}: record {missing} (counting from 0) has no string field {asked!r}")
        return asked
    if len(fields) != 1:
        found = ", ".join(fields) or "none"
        raise click.ClickException(
            f"{path}: pick the answer field with --base-field/--adapter-field (*_response fields: {found})"
        )
    return fields[0]


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--compare", is_flag=True, help="FILES are BASE ADAPTER: paired statistics of their answers.")
@click.option("--base-field", default=None, help="With --compare: BASE's answer field (default: its only *_response).")
@click.option("--adapter-field", default=None, help="With --compare: ADAPTER's answer field.")
@click.option("--seed", default=42, show_default=True, help="With --compare: the bootstrap's and permutations' seed.")
def score(files: tuple[Path, ...], compare: bool, base_field: str | None, adapter_field: str | None, seed: int) -> None:
    """Friction metrics of every *_response field in JSON or JSON Lines FILES, as one JSON object keyed by file.

    E.g. data/eval/samples.jsonl (what evaluate wrote), or any file of objects with *_response string fields.

    With --compare BASE ADAPTER: evaluate's paired statistics of two answer files (one JSON object: per metric base,
    adapter, diff, ci95, p, p_holm, n; then per category). Answers pair by `id` (and `sample`) when every record has
    an id, else by position; a prompt's samples are averaged first. One file with both answers works too:
    `friction score --compare F F --base-field baseline_response --adapter-field tuned_response`.
    """
    if compare:
        if len(files) != 2:
            raise click.ClickException(f"--compare takes two files, BASE and ADAPTER; got {len(files)}")
        _compare_files(files[0], files[1], base_field, adapter_field, seed)
        return
    from friction import friction_metrics

    summaries = {}
    for path in files:
        records = _records(path)
        try:
            summaries[str(path)] = friction_metrics.score_records(records)
        except ValueError as error:
            raise click.ClickException(f"{path}: {error}") from None
    click.echo(json.dumps(summaries, indent=2))


def _compare_files(
    base_path: Path, adapter_path: Path, base_field: str | None, adapter_field: str | None, seed: int
) -> None:
    from friction import comparison

    base_records, adapter_records = _records(base_path), _records(adapter_path)
    base_field = _response_field(base_path, base_records, base_field)
    adapter_field = _response_field(adapter_path, adapter_records, adapter_field)
    try:
        samples = comparison.samples_of_two_files(base_records, base_field, adapter_records, adapter_field)
    except ValueError as error:
        raise click.ClickException(f"{base_path} and {adapter_path}: {error}") from None
    result = {
        "base": f"{base_path}:{base_field}",
        "adapter": f"{adapter_path}:{adapter_field}",
        "comparison": comparison.comparison(samples, seed),
        "categories": comparison.by_category(samples, seed),
    }
    click.echo(json.dumps(result, indent=2))


@main.command()
def pin() -> None:
    """Replace each Hub revision in params.yaml that is a branch or tag by the commit it names now.

    Asks the Hub, or with HF_HUB_OFFLINE=1 the local Hugging Face cache. Comments and layout are kept.
    """
    params = load_params()
    from friction.commands import pin as stage

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
    from friction.commands import remote as stage

    existing = stage.current()
    if url is None or (if_unset and existing is not None):
        click.echo(stage.describe(existing))
        return
    install = stage.missing_plugin(url)  # first: an unknown scheme stops here
    # make setup's one-machine default has a name of its own, which a shared remote set later replaces
    name = stage.ONE_MACHINE if local and if_unset else stage.NAME
    kept = stage.set_remote(url, local, name)
    scope = ".dvc/config.local (this clone only)" if local else ".dvc/config: commit it so every clone uses it"
    click.echo(f"DVC remote {name!r} -> {kept}, in {scope}")
    if not local:
        stage.leave_shared_remote_in_use()
    if install is not None:
        click.echo(f"warning: DVC cannot reach {kept} until its plugin is installed: {install}", err=True)


@main.command()
@click.argument("targets", nargs=-1)
def pull(targets: tuple[str, ...]) -> None:
    """`dvc pull [TARGETS]`, naming the remote it looked in and how to set it when something is not there."""
    from friction.commands import remote as stage

    stage.pull(targets)


@main.command()
@click.argument("version")
def release(version: str) -> None:
    """Tag VERSION (vX.Y.Z) of the model artifact with gto: refused for a dirty workspace or an unpushed artifact."""
    from friction.commands import release as stage

    stage.run(version)


def adapter_options(command):
    """--adapter DIR or --rev REV: which published adapter folder (default: the workspace's, dvc.yaml's artifact)."""
    command = click.option(
        "--rev", help="A version (v1.0.0), commit, branch, tag or experiment: its artifact, from DVC's cache or remote."
    )(command)
    return click.option(
        "--adapter",
        type=click.Path(file_okay=False, path_type=Path),
        help="An adapter folder (default: the artifact folder dvc.yaml names, models/friction-adapter).",
    )(command)


@main.command()
@adapter_options
@click.argument("prompt", required=False)
@click.option("--system", help="The system turn (default: params.yaml's mix.system_prompt, what training used).")
@click.option("--max-new-tokens", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.6, show_default=True, type=click.FloatRange(min=0), help="0: greedy.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling, for a reply you can get again.")
def chat(
    adapter: Path | None,
    rev: str | None,
    prompt: str | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> None:
    """Talk to base + adapter in ChatML as trained: one reply to PROMPT, or a conversation without one."""
    if system is None and Path("params.yaml").is_file():
        system = load_params().mix.system_prompt
    from transformers import set_seed

    from friction.adapter import adapter_folder, load_base, with_adapter
    from friction.commands import chat as stage

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
    from friction.adapter import adapter_folder
    from friction.commands import merge as stage

    stage.check_out(out)  # before an adapter is fetched or a model loaded
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
    from friction.adapter import adapter_folder
    from friction.commands import push as stage

    with adapter_folder(adapter, rev) as folder:
        stage.run(folder, repo_id, private, dry_run, message)
