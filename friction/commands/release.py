"""Register a version of the model artifact with gto, once nobody else could fail to get it.

A version is gto's annotated git tag `friction-adapter@vX.Y.Z` on HEAD; `dvc artifacts get` and `gto show` find it.
The GGUF export (`friction-adapter-gguf`, dvc.yaml) gets the same version in a tag of its own.
It is only worth tagging what another clone can rebuild the same way and download: a commit with no uncommitted
change, a pipeline that is up to date with it, and the artifact's files already in the DVC remote.
"""

from __future__ import annotations

import json
import re
import subprocess

import click

from friction.commands import remote
from friction.pipeline import ARTIFACT, artifact_path, released_artifacts

SEMVER = re.compile(r"^v\d+\.\d+\.\d+$")


def output_of(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def refusal(version: str) -> str | None:
    """Why `version` must not be registered now; None when it may."""
    if not SEMVER.match(version):
        return f"VERSION={version!r} is not a version gto accepts: write it vMAJOR.MINOR.PATCH, e.g. v1.0.0"
    dirty = output_of("git", "status", "--porcelain", "--untracked-files=normal")
    if dirty:
        return f"the workspace has uncommitted changes; commit them (or stash them) first:\n{dirty.rstrip()}"
    stale = json.loads(output_of("dvc", "status", "--json") or "{}")
    if stale:
        stages = ", ".join(stale)
        return f"the pipeline is not up to date with this commit (dvc status: {stages}); run dvc repro and commit"
    configured = remote.current()
    if configured is None:
        return f"there is no DVC remote to pull the artifact from: {remote.describe(None)}"
    for artifact in released_artifacts():
        path = artifact_path(artifact)
        unpushed = json.loads(output_of("dvc", "status", "--cloud", "--json", str(path)) or "{}")
        if unpushed:
            name, url = configured
            return (
                f"{path} is not in DVC remote {name!r} ({url}) yet: run `dvc push` first ({len(unpushed)} files "
                "missing)"
            )
    return None


def run(version: str) -> None:
    problem = refusal(version)
    if problem is not None:
        raise click.ClickException(f"not releasing {ARTIFACT}@{version}: {problem}")
    commit = output_of("git", "rev-parse", "--short", "HEAD").strip()
    tags = []
    for artifact in released_artifacts():
        output_of("gto", "register", artifact, "HEAD", "--version", version, "--message", f"{artifact} {version}")
        tags.append(f"{artifact}@{version}")
        click.echo(f"registered {tags[-1]} (an annotated git tag on {commit})")
    click.echo(f"publish it: git push origin {' '.join(tags)}")
    click.echo(f"then anyone gets it: dvc artifacts get <git URL> {ARTIFACT} --rev {version}")
