"""fetch: bring every data source and the base model within reach, pinned.

Hub datasets are downloaded with huggingface_hub at the requested revision and rewritten as JSON Lines; local
sources under data/sources/ are copied byte for byte. The base model is downloaded into the Hugging Face cache
(not the workspace); the manifest records the commit it resolved to, so later stages load exactly that commit and
`dvc.lock` changes when a rerun of fetch finds that upstream moved.

A branch or tag can move upstream: fetch warns about each revision that is not a commit, and warns loudly when one
now resolves to another commit than in the last fetch. `friction pin` (stages/pin.py) writes the commits into
params.yaml.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import click
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from stages.artifacts import RAW_MANIFEST, atomic_output, sha256_file, write_json
from stages.config import LOCAL_SOURCES_DIR, ModelParams, Params, SourceParams

# Weights, configs and tokenizer files; skips the original checkpoints and other formats some repos also carry.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]

TOKEN_REMEDY = (
    "give a token that can read it: the HF_TOKEN environment variable, or `hf auth login` "
    "(`huggingface-cli login` before huggingface_hub 1.0)"
)


def is_commit(revision: str) -> bool:
    """A full commit sha: the only revision that always names the same files (branches and tags can move)."""
    return re.fullmatch(r"[0-9a-f]{40}", revision) is not None


@dataclass(frozen=True)
class HubRepo:
    """A Hub repo at the revision params.yaml asks for, and where params.yaml says so (for messages and `pin`)."""

    repo_id: str
    repo_type: Literal["dataset", "model"]
    revision: str
    revision_path: tuple[str, ...]
    """Keys leading to the revision in params.yaml, e.g. ("data", "sources", "overthinking", "revision")."""

    @classmethod
    def of_source(cls, name: str, source: SourceParams) -> HubRepo:
        assert source.hub is not None, f"data.sources.{name} is a local file"
        return cls(source.hub, "dataset", source.revision, ("data", "sources", name, "revision"))

    @classmethod
    def of_model(cls, model: ModelParams) -> HubRepo:
        assert model.revision is not None, "config gives a revision exactly to a Hub model"
        return cls(model.base, "model", model.revision, ("model", "revision"))

    @property
    def revision_key(self) -> str:
        return ".".join(self.revision_path)

    @property
    def repo_key(self) -> str:
        return "model.base" if self.repo_type == "model" else ".".join((*self.revision_path[:-1], "hub"))

    @property
    def described(self) -> str:
        return f"{self.repo_key}: {self.repo_type} {self.repo_id!r} at revision {self.revision!r}"

    @property
    def replace_remedy(self) -> str:
        if self.repo_type == "model":
            return "replace model.base in params.yaml"
        source = ".".join(self.revision_path[:-1])
        return f"remove or replace {source} in params.yaml (and its mix.weights entry)"


def hub_repos(params: Params) -> list[HubRepo]:
    """Every Hub source and the base model if it is on the Hub, in the order of params.yaml."""
    model = [HubRepo.of_model(params.model)] if params.model.revision is not None else []
    sources = [HubRepo.of_source(name, source) for name, source in params.data.sources.items() if source.hub]
    return model + sources


@contextlib.contextmanager
def hub_errors_explained(repo: HubRepo) -> Iterator[None]:
    """Turn huggingface_hub's errors about `repo` into messages naming its params.yaml key and what to do."""
    try:
        yield
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise click.ClickException(
            f"{repo.described} is gated: accept its terms on its Hub page, then {TOKEN_REMEDY}; "
            f"or {repo.replace_remedy}"
        ) from None
    except RepositoryNotFoundError:
        raise click.ClickException(
            f"{repo.described} was not found on the Hub. If it is private, {TOKEN_REMEDY}; "
            f"if it is gone, {repo.replace_remedy}"
        ) from None
    except RevisionNotFoundError:
        raise click.ClickException(
            f"{repo.revision_key}: {repo.repo_type} {repo.repo_id!r} has no revision {repo.revision!r} on the Hub"
        ) from None


def hub_snapshot(repo: HubRepo, **kwargs: Any) -> Path:
    """Download (or find in the cache) the requested revision; its folder is named after the commit."""
    with hub_errors_explained(repo):
        try:
            snapshot = Path(snapshot_download(repo.repo_id, revision=repo.revision, repo_type=repo.repo_type, **kwargs))
        except LocalEntryNotFoundError:
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
        if not Path(source.path).is_file():
            raise click.ClickException(f"data.sources.{name}.path: {source.path} is not a file")
        shutil.copyfile(source.path, target)
        resolved = None
    else:
        # datasets is imported here: it is slow to import and only Hub sources need it.
        from datasets import load_dataset

        snapshot = hub_snapshot(HubRepo.of_source(name, source))
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
    snapshot = hub_snapshot(HubRepo.of_model(model), allow_patterns=MODEL_FILES)
    return {
        "location": model.base,
        "requested_revision": model.revision,
        "resolved_revision": snapshot.name,
        "files": {str(p.relative_to(snapshot)): p.stat().st_size for p in sorted(snapshot.rglob("*")) if p.is_file()},
    }


class Resolved(NamedTuple):
    repo_id: str
    revision: str
    """As requested in params.yaml."""
    commit: str

    def moved_to(self, later: Resolved) -> bool:
        """Whether `later` resolved the same request to another commit: the revision moved upstream in between."""
        return (self.repo_id, self.revision) == (later.repo_id, later.revision) and self.commit != later.commit


def resolved_commits(manifest: dict) -> dict[str, Resolved]:
    """What a fetch resolved, by revision key (`model.revision`, `data.sources.<name>.revision`)."""
    entries = {f"data.sources.{name}.revision": entry for name, entry in manifest["sources"].items()}
    entries["model.revision"] = manifest["base_model"]
    return {
        key: Resolved(entry["location"], entry["requested_revision"], entry["resolved_revision"])
        for key, entry in entries.items()
        if entry["resolved_revision"] is not None  # local sources and models
    }


def last_fetch_commits(manifest_path: Path = RAW_MANIFEST) -> dict[str, Resolved]:
    """What the last fetch resolved, from its manifest in the workspace or in DVC's cache; empty if unknown."""
    try:
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        else:
            # `dvc repro` deletes data/raw before it runs fetch; the copy dvc.lock points to is still in DVC's cache.
            import dvc.api

            manifest = json.loads(dvc.api.read(str(manifest_path)))
        return resolved_commits(manifest)
    except Exception:  # noqa: BLE001 - no DVC repo, never fetched, cache gone: nothing to compare, not an error
        return {}


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
