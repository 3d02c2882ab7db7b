"""The demo's workspace: the one builder behind `make demo`, the tests' workspaces and the benchmarks'.

A workspace holds recipes/demo.yaml as params.yaml, the bundled sources and evaluation prompts, and the tiny base
model in data/sources/demo-base. With `repository`, it is what `make demo` makes: a git repository of this working
tree (tracked files, and untracked ones git does not ignore) whose base is tracked by DVC, all committed, so that a
queued experiment, which runs in a copy of the last commit, finds everything.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
from ruamel.yaml import YAML

from friction.artifacts import atomic_output
from friction.tiny_model import build_tiny_model, corpus_from_jsonl

REPO = Path(__file__).resolve().parents[1]
MARKER = ".friction-demo"  # what build_workspace leaves, so it replaces only folders it made
DEMO_BASE = Path("data/sources/demo-base")  # recipes/demo.yaml's model.base
DEMO_DATA = (Path("data/sources/demo"), Path("data/eval"))


def build_workspace(
    dest: Path, params: dict[str, Any] | None = None, base: Path | None = None, repository: bool = False
) -> Path:
    """Make `dest` a demo workspace: `params` changes recipes/demo.yaml section by section; the base is a copy of
    `base`, or built from the demo's own text (`build_demo_base`). `dest` must be new, empty, or a demo workspace
    this function made (it replaces that whole); anything else is refused, so nothing it did not write is deleted."""
    if dest.exists() and any(dest.iterdir()):
        if not (dest / MARKER).is_file():
            raise click.ClickException(
                f"{dest}: not empty and not a demo workspace (no {MARKER}); choose a new folder or empty this one"
            )
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MARKER).write_text("made by friction.demo.build_workspace; replaced whole on the next build\n")
    for relative in tracked_files() if repository else DEMO_DATA:
        copy(REPO / relative, dest / relative)
    shutil.copyfile(REPO / "recipes/demo.yaml", dest / "params.yaml")
    update_params(dest / "params.yaml", params or {})
    if base is None:
        build_demo_base(dest / DEMO_BASE, dest)
    else:
        shutil.copytree(base, dest / DEMO_BASE)
    if repository:
        commit_workspace(dest)
    return dest


def build_demo_base(out: Path, workspace: Path, vocab_size: int = 3000) -> None:
    """The tiny Qwen2 base, its BPE trained on the workspace's demo sources and evaluation prompts."""
    corpus = sorted((workspace / "data/sources/demo").glob("*.jsonl")) + [workspace / "data/eval/prompts.jsonl"]
    with atomic_output(out) as scratch:
        build_tiny_model(corpus_from_jsonl(corpus), scratch, tokenizer_vocab_size=vocab_size)


def update_params(path: Path, changes: dict[str, Any]) -> None:
    """Set keys of a params.yaml in place, section by section (a dict updates its section, anything else replaces
    it), keeping the file's comments and order."""
    yaml = YAML()
    params = yaml.load(path)
    for section, values in changes.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    yaml.dump(params, path)


def tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [Path(name) for name in listed.split("\0") if name and (REPO / name).is_file()]


def copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def commit_workspace(dest: Path) -> None:
    def run(*command: str) -> None:
        subprocess.run(command, cwd=dest, check=True, capture_output=True)

    run("git", "init", "-q")
    for key, value in (("user.name", "demo"), ("user.email", "demo@localhost")):  # only where git has none
        if subprocess.run(["git", "config", key], cwd=dest, capture_output=True).returncode != 0:
            run("git", "config", key, value)
    run("dvc", "add", "-q", str(DEMO_BASE))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "demo: recipes/demo.yaml as params.yaml, the tiny base model")
