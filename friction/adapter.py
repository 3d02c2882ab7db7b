"""The published adapter folder as a model to use: found in the workspace or at a git revision, loaded on its base.

The folder is the `friction-adapter` artifact (dvc.yaml): PEFT weights and config, the tokenizer with the ChatML
template it was trained on, the card. Its adapter_config.json names the base model (a Hub id or a local folder,
relative to the repository's root) and the base's commit, as fetch pinned them.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from friction.pipeline import ARTIFACT, artifact_path

VERSION = re.compile(r"^v\d+\.\d+\.\d+$")


@contextlib.contextmanager
def adapter_folder(adapter: Path | None, rev: str | None) -> Iterator[Path]:
    """The folder to use: `adapter`, the artifact at git revision or version `rev`, or the workspace's artifact."""
    if adapter is not None and rev is not None:
        raise click.UsageError("give --adapter or --rev, not both")
    if rev is None:
        folder = adapter or artifact_path()
        if not (folder / "adapter_config.json").is_file():
            hint = "" if adapter else f" (dvc repro, or `friction pull {folder}` for the one in the DVC remote)"
            raise click.ClickException(f"{folder}: no adapter_config.json: not an adapter folder{hint}")
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="friction-adapter-") as scratch:
        yield download_at(rev, Path(scratch) / "adapter")


def download_at(rev: str, out: Path) -> Path:
    """The artifact as committed at `rev`: a version (v1.0.0, gto's tag friction-adapter@v1.0.0), a commit, branch,
    tag or experiment name; from the DVC cache, or else the DVC remote."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev

    git_rev = f"{ARTIFACT}@{rev}" if VERSION.match(rev) else rev
    try:
        with Repo() as repo:
            commit = resolve_rev(repo.scm, git_rev)
        require_commit(rev, commit)
        Repo.get(".", str(artifact_path()), out=str(out), rev=commit)
    except RevError:
        raise click.ClickException(f"--rev {rev}: no such version, commit, branch, tag or experiment here") from None
    except FileNotFoundError:
        raise click.ClickException(f"--rev {rev}: {artifact_path()} is not part of commit {commit[:10]}") from None
    except DvcException as error:
        raise click.ClickException(
            f"--rev {rev}: could not get {artifact_path()} at {git_rev} ({error}); is it pushed to the DVC remote "
            "(`friction remote` shows it)?"
        ) from None
    click.echo(f"{artifact_path()} at {git_rev} ({commit[:10]})", err=True)
    return out


def require_commit(rev: str, object_id: str) -> None:
    """`rev` must name a commit: git also resolves a tree's or a file's id, which holds no artifact to get."""
    import subprocess

    named = subprocess.run(["git", "cat-file", "-t", object_id], capture_output=True, text=True, check=False)
    if named.stdout.strip() != "commit":
        what = named.stdout.strip() or "object"
        raise click.ClickException(
            f"--rev {rev}: names a git {what}, not a commit; give a version (v1.0.0), commit, branch, tag or experiment"
        )


def base_reference(folder: Path) -> tuple[str, str | None]:
    """(base model location, its revision) as adapter_config.json records them."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    location = config.get("base_model_name_or_path")
    if not location:
        raise click.ClickException(f"{folder}/adapter_config.json: no base_model_name_or_path")
    return location, config.get("revision")


def require_base(location: str) -> None:
    """A base that looks like a local folder must be there (the demo's is tracked by DVC: `dvc pull` brings it)."""
    looks_local = location.startswith((".", "/")) or location.count("/") >= 2  # a Hub id is `name` or `owner/name`
    if looks_local and not Path(location).is_dir():
        raise click.ClickException(
            f"base model {location} (named in the adapter's adapter_config.json) not found: run from the repository's "
            f"root; for the demo's base, `friction pull {location}.dvc` or `friction demo-base --out {location}`"
        )


def load_base(folder: Path, dtype: Any = "auto", **kwargs: Any):
    """The base model the adapter in `folder` was trained on, at the revision it records."""
    from transformers import AutoModelForCausalLM

    location, revision = base_reference(folder)
    require_base(location)
    try:
        return AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype, **kwargs)
    except OSError as error:  # not in the Hugging Face cache offline, no access, no such repo
        raise click.ClickException(f"base model {location}: {error}") from None


def with_adapter(base, folder: Path):
    """(base + the adapter in `folder` as a PeftModel in eval mode, the adapter's tokenizer)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    return PeftModel.from_pretrained(base, str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
