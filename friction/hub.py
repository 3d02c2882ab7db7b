"""The Hub repos params.yaml names, and what a fetch resolved them to: shared by fetch and `friction pin`.

Each repo knows its params.yaml keys, so every message about it names the key to change.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import click
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from friction.artifacts import RAW_MANIFEST
from friction.config import ModelParams, Params, SourceParams


def transport_errors() -> tuple[type[Exception], ...]:
    """The network errors huggingface_hub lets through, whichever HTTP client it is built on: httpx2 from 2.0, httpx
    in 1.x (the unsloth set). Both can be installed at once (the unsloth set lowers huggingface-hub over an
    environment that had 2.x), so each one present is caught, not the first that imports."""
    errors = []
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return tuple(errors)


TRANSPORT_ERRORS = transport_errors()

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
