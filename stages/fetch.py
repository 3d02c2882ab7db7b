"""fetch: bring every data source and the base model within reach, pinned.

Hub datasets are downloaded with huggingface_hub at the requested revision and rewritten as JSON Lines; local
sources under data/sources/ are copied byte for byte. The base model is downloaded into the Hugging Face cache
(not the workspace); the manifest records the commit it resolved to, so later stages load exactly that commit and
`dvc.lock` changes when upstream does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from stages.artifacts import atomic_output, sha256_file, write_json
from stages.config import LOCAL_SOURCES_DIR, ModelParams, Params, SourceParams

# Weights, configs and tokenizer files; skips the original checkpoints and other formats some repos also carry.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def hub_snapshot(repo_id: str, revision: str, repo_type: str, **kwargs) -> Path:
    """Download (or find in the cache) one revision of a Hub repo; explain what to do when that fails."""
    what = f"{repo_type} {repo_id!r} at revision {revision!r}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, **kwargs))
    except GatedRepoError:
        raise click.ClickException(
            f"{what} is gated: accept its terms on the Hub, then set HF_TOKEN or run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise click.ClickException(
            f"{what} was not found: it may be private (set HF_TOKEN or run `hf auth login`) or gone "
            "(remove or replace it in params.yaml)"
        ) from None
    except RevisionNotFoundError:
        raise click.ClickException(f"{what}: no such revision on the Hub") from None
    except LocalEntryNotFoundError:
        raise click.ClickException(
            f"{what} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or the network is down)"
        ) from None


def fetch_source(name: str, source: SourceParams, out_dir: Path) -> dict:
    target = out_dir / f"{name}.jsonl"
    if source.path is not None:
        if not Path(source.path).is_file():
            raise click.ClickException(f"data.sources.{name}.path: {source.path} is not a file")
        shutil.copyfile(source.path, target)
        resolved = None
    else:
        # datasets is imported here: it is slow to import and only Hub sources need it.
        from datasets import load_dataset

        snapshot = hub_snapshot(source.hub, source.revision, "dataset")
        load_dataset(str(snapshot), split="train").to_json(target, lines=True, force_ascii=False)
        resolved = snapshot.name
    with target.open("rb") as handle:
        rows = sum(1 for line in handle if line.strip())
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
    snapshot = hub_snapshot(model.base, model.revision, "model", allow_patterns=MODEL_FILES)
    return {
        "location": model.base,
        "requested_revision": model.revision,
        "resolved_revision": snapshot.name,
        "files": {str(p.relative_to(snapshot)): p.stat().st_size for p in sorted(snapshot.rglob("*")) if p.is_file()},
    }


def run(params: Params, out_dir: Path) -> None:
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
