"""A second person gets the model: two clones of one bare git origin and one DVC storage folder, releases with gto,
experiments pushed and pulled, and queued experiments. Real git, DVC and gto in temporary folders; nothing may be
written outside them."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO
from ruamel.yaml import YAML

pytestmark = [pytest.mark.e2e, pytest.mark.needs_triton]  # the demo's pipeline trains with TRL

ARTIFACT = "models/friction-adapter"


def run(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if ok:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def set_param(workspace: Path, section: str, key: str, value) -> None:
    yaml = YAML()
    params = yaml.load(workspace / "params.yaml")
    params[section][key] = value
    yaml.dump(params, workspace / "params.yaml")


def same_tree(left: Path, right: Path) -> bool:
    """Both folders hold the same files, byte for byte."""
    names = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(left / name, right / name, shallow=False) for name in names)


def dir_hash(workspace: Path, stage: str = "card") -> str:
    """The md5 of the artifact folder as dvc.lock records it (DVC stores the folder's listing under it + .dir)."""
    lock = YAML(typ="safe").load((workspace / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"][stage]["outs"] if o["path"] == ARTIFACT]
    return out["md5"]


def in_storage(storage: Path, md5: str) -> bool:
    return (storage / "files/md5" / md5[:2] / md5[2:]).is_file()


def repo_state() -> str:
    """What this checkout holds, ignored files included, to show a test added nothing to it."""
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "\n".join(line for line in listing.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line)


@pytest.fixture
def env(made_demo, tmp_path: Path) -> dict[str, str]:
    """The made demo's isolated environment, with a git identity for the commits and gto's annotated tags."""
    identity = {"GIT_AUTHOR_NAME": "first", "GIT_AUTHOR_EMAIL": "first@example.com"}
    return {**made_demo[2], **identity, "GIT_COMMITTER_NAME": "first", "GIT_COMMITTER_EMAIL": "first@example.com"}


def test_a_second_clone_gets_every_version_and_an_experiment(demo_copy: Path, env, tmp_path: Path):
    before, root_remote_existed = repo_state(), Path("/dvc-remote").exists()
    first, storage, origin = demo_copy, tmp_path / "storage", tmp_path / "origin.git"
    run("git", "init", "-q", "--bare", str(origin), cwd=tmp_path, env=env)
    run("git", "remote", "add", "origin", str(origin), cwd=first, env=env)
    shared = run("make", "remote", f"URL={storage}", cwd=first, env=env).stdout
    assert "removed this clone's one-machine default remote 'one-machine'" in shared  # make demo's, replaced
    assert f"'storage' -> {storage}, in .dvc/config: commit it" in shared
    run("git", "commit", "-qam", "the shared DVC remote", cwd=first, env=env)

    unpushed = run("make", "release", "VERSION=v1.0.0", cwd=first, env=env, ok=False)
    assert unpushed.returncode != 0
    assert f"{ARTIFACT} is not in DVC remote 'storage' ({storage}) yet: run `dvc push` first" in unpushed.stderr
    run("dvc", "push", cwd=first, env=env)
    assert in_storage(storage, dir_hash(first))
    (first / "notes.txt").write_text("not committed\n")
    dirty = run("make", "release", "VERSION=v1.0.0", cwd=first, env=env, ok=False)
    assert dirty.returncode != 0 and "the workspace has uncommitted changes" in dirty.stderr
    assert "notes.txt" in dirty.stderr
    (first / "notes.txt").unlink()
    assert "registered friction-adapter@v1.0.0" in run("make", "release", "VERSION=v1.0.0", cwd=first, env=env).stdout
    v1 = tmp_path / "v1"
    shutil.copytree(first / ARTIFACT, v1)

    set_param(first, "lora", "rank", 4)
    run("dvc", "repro", cwd=first, env=env)
    run("git", "commit", "-qam", "lora.rank 4", cwd=first, env=env)
    run("dvc", "push", cwd=first, env=env)
    run("make", "release", "VERSION=v2.0.0", cwd=first, env=env)
    v2 = tmp_path / "v2"
    shutil.copytree(first / ARTIFACT, v2)
    assert not same_tree(v1, v2)

    run("dvc", "exp", "run", "-n", "short-answers", "-S", "evaluate.max_new_tokens=8", cwd=first, env=env)
    experiment = tmp_path / "experiment"
    shutil.copytree(first / ARTIFACT, experiment)
    assert not in_storage(storage, dir_hash(first))
    run("dvc", "exp", "push", "origin", "short-answers", cwd=first, env=env)
    assert in_storage(storage, dir_hash(first))  # where `dvc push` wrote, not a path resolved elsewhere
    run("git", "push", "-q", "origin", "--all", cwd=first, env=env)
    run("git", "push", "-q", "origin", "--tags", cwd=first, env=env)

    second = tmp_path / "second"
    run("git", "clone", "-q", str(origin), str(second), cwd=tmp_path, env=env)
    versions = run("gto", "show", "friction-adapter", cwd=second, env=env).stdout
    assert "v1.0.0" in versions and "v2.0.0" in versions
    for version, expected in (("v1.0.0", v1), ("v2.0.0", v2)):
        run("git", "checkout", "-q", f"friction-adapter@{version}", cwd=second, env=env)
        run("friction", "pull", ARTIFACT, cwd=second, env=env)
        assert same_tree(second / ARTIFACT, expected), version
        got = tmp_path / f"got-{version}"
        run(
            "dvc",
            "artifacts",
            "get",
            str(origin),
            "friction-adapter",
            "--rev",
            version,
            "-o",
            str(got),
            cwd=tmp_path,
            env=env,
        )
        assert same_tree(got, expected), version
        exported = tmp_path / f"gguf-{version}"  # the export stage's folder is released with the same version
        run(
            "dvc",
            "artifacts",
            "get",
            str(origin),
            "friction-adapter-gguf",
            "--rev",
            version,
            "-o",
            str(exported),
            cwd=tmp_path,
            env=env,
        )
        assert (exported / "Modelfile").is_file() and (exported / "friction-lora-f16.gguf").is_file(), version

    run("git", "checkout", "-q", "-", cwd=second, env=env)
    run("dvc", "exp", "pull", "origin", "short-answers", cwd=second, env=env)
    run("dvc", "exp", "apply", "short-answers", cwd=second, env=env)
    run("dvc", "pull", ARTIFACT, cwd=second, env=env)
    assert same_tree(second / ARTIFACT, experiment)

    assert repo_state() == before  # nothing written into this checkout (its dvc-remote/ folder included)
    assert Path("/dvc-remote").exists() == root_remote_existed
    assert Path(env["HOME"]).is_relative_to(tmp_path.parent)  # the session's temporary folder


def test_a_pull_that_finds_nothing_names_the_remote(demo_copy: Path, env, tmp_path: Path):
    empty = tmp_path / "empty-storage"
    run("friction", "remote", "--local", str(empty), cwd=demo_copy, env=env)
    shutil.rmtree(demo_copy / ".dvc/cache")
    shutil.rmtree(demo_copy / ARTIFACT)
    result = run("friction", "pull", ARTIFACT, cwd=demo_copy, env=env, ok=False)
    assert result.returncode != 0
    assert f"dvc pull did not find everything in DVC remote 'storage' ({empty})" in result.stderr
    assert "make remote URL=" in result.stderr

    (demo_copy / ".dvc/config.local").unlink()
    unset = run("friction", "pull", cwd=demo_copy, env=env, ok=False)
    assert unset.returncode != 0 and "no DVC remote is set; set it with `make remote URL=" in unset.stderr


def test_a_relative_remote_is_stored_absolute(demo_copy: Path, env):
    run("friction", "remote", "../team-storage", cwd=demo_copy, env=env)
    config = (demo_copy / ".dvc/config").read_text()
    assert f"url = {demo_copy.parent / 'team-storage'}" in config
    s3 = run("friction", "remote", "s3://bucket/friction", cwd=demo_copy, env=env)
    assert "pip install 'dvc[s3]==3.67.1'" in s3.stderr  # dvc-s3 is not installed here
    unknown = run("friction", "remote", "ftp://host/x", cwd=demo_copy, env=env, ok=False)
    assert unknown.returncode != 0 and "DVC has no remote type for ftp://" in unknown.stderr


def test_two_queued_experiments_finish(demo_copy: Path, env):
    for tokens in (8, 16):
        run(
            "dvc",
            "exp",
            "run",
            "--queue",
            "-n",
            f"tokens-{tokens}",
            "-S",
            f"evaluate.max_new_tokens={tokens}",
            cwd=demo_copy,
            env=env,
        )
    run("dvc", "queue", "start", "-j", "1", cwd=demo_copy, env=env)
    deadline = time.monotonic() + 900
    while True:
        status = run("dvc", "queue", "status", cwd=demo_copy, env=env).stdout
        if not any(state in status for state in ("Queued", "Running")) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert "Failed" not in status, run("dvc", "queue", "logs", "tokens-8", cwd=demo_copy, env=env, ok=False).stdout
    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=demo_copy, env=env).stdout)
    experiments = {exp["name"]: exp for row in shown for exp in (row.get("experiments") or [])}
    assert {"tokens-8", "tokens-16"} <= set(experiments)
    for name in ("tokens-8", "tokens-16"):
        (revision,) = experiments[name]["revs"]
        metrics = revision["data"]["metrics"]["metrics/evaluate.json"]["data"]
        assert metrics["friction"]["prompts"] == 20, name  # the demo recipe's evaluate.max_prompts
    compare = run("make", "compare", "ARGS=--md", cwd=demo_copy, env=env).stdout  # a table as wide as it needs
    assert "evaluate.max_new_tokens" in compare and "best_eval_loss" in compare and "sources." not in compare
