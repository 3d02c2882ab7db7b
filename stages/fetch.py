"""fetch: bring every data source and the base model within reach, pinned.

Hub datasets are downloaded with huggingface_hub at the requested revision and rewritten as JSON Lines; local
sources under data/sources/ are copied byte for byte. The base model is downloaded into the Hugging Face cache
(not the workspace); the manifest records the commit it resolved to, so later stages load exactly that commit and
`dvc.lock` changes when a rerun of fetch finds that upstream moved.

A branch or tag can move upstream: fetch warns about each revision that is not a commit, and warns loudly when one
now resolves to another commit than in the last fetch. `friction pin` (friction/commands/pin.py) writes the commits into
params.yaml.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click
from huggingface_hub import is_offline_mode, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from friction import environment
from friction.artifacts import atomic_output, read_json, sha256_file, write_json
from friction.config import LOCAL_SOURCES_DIR, ModelParams, Params, SourceParams, load_params
from friction.hub import HubRepo, Resolved, hub_errors_explained, is_commit, last_fetch_commits, resolved_commits
from friction.pipeline import path_option
from friction.source_rows import count_rows, local_source_file

# Weights, configs and tokenizer files; skips the original checkpoints and other formats some repos also carry.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def hub_snapshot(repo: HubRepo, **kwargs: Any) -> Path:
    """Download (or find in the cache) the requested revision; its folder is named after the commit."""
    with hub_errors_explained(repo):
        try:
            # Offline, the cache alone: huggingface-hub 1.x (the unsloth set), given a commit and no
            # local_files_only, asks the Hub for the commit's file list even with HF_HUB_OFFLINE set, and fails.
            snapshot = Path(
                snapshot_download(
                    repo.repo_id,
                    revision=repo.revision,
                    repo_type=repo.repo_type,
                    local_files_only=is_offline_mode(),
                    **kwargs,
                )
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            raise click.ClickException(
                f"{repo.described} is not in the local Hugging Face cache and the Hub cannot be reached "
                "(HF_HUB_OFFLINE is set or the network is down)"
            ) from None
    if not is_commit(repo.revision):
        click.echo(
            f"fetch: warning: {repo.revision_key} is {repo.revision!r}, a branch or tag that can move upstream; "
            f"it resolved to commit {snapshot.name}. Run `friction pin` to write the commit into params.yaml.",
            err=True,
        )
    return snapshot


def fetch_source(name: str, source: SourceParams, out_dir: Path) -> dict:
    target = out_dir / f"{name}.jsonl"
    if source.path is not None:
        shutil.copyfile(local_source_file(name, source.path), target)
        resolved = None
    else:
        # datasets is imported here: it is slow to import and only Hub sources need it.
        from datasets import load_dataset

        snapshot = hub_snapshot(HubRepo.of_source(name, source))
        load_dataset(str(snapshot), split="train").to_json(target, lines=True, force_ascii=False)
        resolved = snapshot.name
    rows = count_rows(target)  # as mix reads them: a first line holding only a byte-order mark is no row
    return {
        "location": source.hub or source.path,
        "format": source.format,
        "requested_revision": None if source.path else source.revision,
        "resolved_revision": resolved,
        "rows": rows,
        "sha256": sha256_file(target),
    }


def fetch_base_model(model: ModelParams) -> dict:
    location = Path(model.base)
    if location.is_dir():
        files = sorted(p for p in location.rglob("*") if p.is_file())
        return {
            "location": model.base,
            "requested_revision": None,
            "resolved_revision": None,
            "files": {str(p.relative_to(location)): sha256_file(p) for p in files},
        }
    if location.is_relative_to(LOCAL_SOURCES_DIR):
        # Not a Hub id: snapshot_download would fail on the repo id with a traceback.
        raise click.ClickException(
            f"model.base: {model.base} is not a directory (the demo recipe's is made by `friction demo-base`)"
        )
    snapshot = hub_snapshot(HubRepo.of_model(model), allow_patterns=MODEL_FILES)
    return {
        "location": model.base,
        "requested_revision": model.revision,
        "resolved_revision": snapshot.name,
        "files": {str(p.relative_to(snapshot)): p.stat().st_size for p in sorted(snapshot.rglob("*")) if p.is_file()},
    }


def warn_about_upstream_changes(before: dict[str, Resolved], now: dict[str, Resolved]) -> None:
    """Say loudly when a revision asked for before now names another commit: the data changed upstream."""
    for key, new in now.items():
        old = before.get(key)
        if old is None or not old.moved_to(new):
            continue
        click.echo(
            f"fetch: WARNING: {key} {new.revision!r} of {new.repo_id} moved upstream: it was commit {old.commit} "
            f"in the last fetch and is now {new.commit}.\n"
            f"fetch: WARNING: every later stage reruns on the new data. To go back, set {key}: {old.commit}; "
            "to keep the new data reproducibly, run `friction pin`.",
            err=True,
        )


def run(params: Params, out_dir: Path) -> None:
    before = last_fetch_commits(out_dir / "manifest.json")  # before atomic_output replaces it
    with atomic_output(out_dir) as scratch:
        scratch.mkdir()
        sources = {}
        for name, source in params.data.sources.items():
            click.echo(f"fetch: {name} <- {source.hub or source.path}")
            sources[name] = fetch_source(name, source, scratch)
            click.echo(f"fetch: {name}: {sources[name]['rows']} rows")
        click.echo(f"fetch: base model <- {params.model.base}")
        manifest = {"sources": sources, "base_model": fetch_base_model(params.model)}
        write_json(scratch / "manifest.json", manifest)
    warn_about_upstream_changes(before, resolved_commits(manifest))


@click.command()
@path_option("--out", "Fetched sources and manifest.json.")
@path_option("--metrics", "Rows per source and the environment of the run.")
def main(out: Path, metrics: Path) -> None:
    """Download or copy every data source and pin the base model."""
    recorded = environment.record("fetch")  # warns before the work when the environment is not the lock's
    run(load_params(), out)
    rows = {name: source["rows"] for name, source in read_json(out / "manifest.json")["sources"].items()}
    write_json(metrics, {"rows": rows, "environment": recorded})
