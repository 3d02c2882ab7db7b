"""Where paths and the DVC remote are written: dvc.yaml's command lines and artifact, and the remote's URL."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from conftest import REPO, isolated_env

from friction.commands import remote
from friction.pipeline import artifact_path, stage_argv


def test_stages_take_their_paths_from_dvc_yaml_only():
    dvc_yaml = REPO / "dvc.yaml"
    assert artifact_path(path=dvc_yaml) == Path("models/friction-adapter")
    assert stage_argv("card", dvc_yaml)[-2:] == ["--out", "models/friction-adapter"]
    assert stage_argv("mix", dvc_yaml)[:6] == ["python", "-m", "stages", "mix", "--raw", "data/raw"]
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    missing = subprocess.run(
        ["python", "-m", "stages", "mix"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "Missing option '--raw'" in missing.stderr
    with pytest.raises(click.ClickException, match="no stage 'mixx'"):
        stage_argv("mixx", dvc_yaml)


def test_a_local_remote_is_written_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert remote.normalised("../storage") == str(tmp_path.parent / "storage")
    assert remote.normalised(f"file://{tmp_path}/x/../y") == str(tmp_path / "y")
    assert remote.normalised("s3://bucket/friction") == "s3://bucket/friction"


def test_a_cloud_remote_names_the_plugin_it_needs():
    assert remote.missing_plugin("/srv/storage") is None
    assert remote.missing_plugin("s3://bucket/x") == "pip install 'dvc[s3]==3.67.1'"  # dvc-s3 is not installed
    assert remote.missing_plugin("ssh://host/srv/x") == "pip install 'dvc[ssh]==3.67.1'"
    with pytest.raises(click.ClickException, match="no remote type for ftp://"):
        remote.missing_plugin("ftp://host/x")


# --- the first person's order: make setup, then make remote URL=..., then dvc push -----------------------------------


def run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture
def clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git clone of this working tree (what `git clone` gives a person), whose `make setup` finds its environment
    installed: .venv/bin is this checkout's, its stamp newer than pyproject.toml (the install itself is not tested)."""
    env = {
        **isolated_env(tmp_path / "env"),
        "GIT_AUTHOR_NAME": "first",
        "GIT_AUTHOR_EMAIL": "first@example.com",
        "GIT_COMMITTER_NAME": "first",
        "GIT_COMMITTER_EMAIL": "first@example.com",
    }
    origin = tmp_path / "origin"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, origin / name)
    run("git", "init", "-q", cwd=origin, env=env)
    run("git", "add", "-A", cwd=origin, env=env)
    run("git", "commit", "-qm", "the project", cwd=origin, env=env)
    workspace = tmp_path / "clone"
    run("git", "clone", "-q", str(origin), str(workspace), cwd=tmp_path, env=env)
    (workspace / ".venv").mkdir()
    (workspace / ".venv/bin").symlink_to(REPO / ".venv/bin")
    (workspace / ".venv/lock").write_text("requirements/lock.txt")
    stamp = workspace / ".venv/.installed-lock"
    stamp.touch()
    later = max((workspace / name).stat().st_mtime for name in ("pyproject.toml", "requirements/lock.txt")) + 60
    os.utime(stamp, (later, later))
    return workspace, env


def pushed_files(storage: Path) -> list[Path]:
    return [path for path in storage.rglob("*") if path.is_file()] if storage.exists() else []


def test_make_remote_after_make_setup_makes_dvc_push_go_there(clone, tmp_path: Path):
    workspace, env = clone
    setup = run("make", "setup", cwd=workspace, env=env).stdout
    assert f"'one-machine' -> {workspace / 'dvc-remote'}, in .dvc/config.local" in setup
    shared = tmp_path / "team-storage"
    made = run("make", "remote", f"URL={shared}", cwd=workspace, env=env).stdout
    assert f"'storage' -> {shared}, in .dvc/config: commit it" in made
    assert "removed this clone's one-machine default remote 'one-machine'" in made
    assert run("dvc", "remote", "list", cwd=workspace, env=env).stdout.split() == ["storage", str(shared), "(default)"]

    (workspace / "data/notes.txt").write_text("what the team shares")
    run("dvc", "add", "-q", "data/notes.txt", cwd=workspace, env=env)
    run("dvc", "push", cwd=workspace, env=env)
    assert len(pushed_files(shared)) == 1 and not pushed_files(workspace / "dvc-remote")
    assert f"DVC remote 'storage': {shared}" in run("make", "remote", cwd=workspace, env=env).stdout


def test_a_clone_set_up_before_the_default_had_its_own_name_pushes_to_the_shared_remote_too(clone, tmp_path: Path):
    workspace, env = clone
    # What make setup wrote before: the one-machine folder as 'storage' in .dvc/config.local.
    old_default = str(workspace / "dvc-remote")
    run("dvc", "remote", "add", "--local", "--default", "storage", old_default, cwd=workspace, env=env)
    shared = tmp_path / "team-storage"
    run("make", "remote", f"URL={shared}", cwd=workspace, env=env)
    (workspace / "data/notes.txt").write_text("what the team shares")
    run("dvc", "add", "-q", "data/notes.txt", cwd=workspace, env=env)
    run("dvc", "push", cwd=workspace, env=env)
    assert len(pushed_files(shared)) == 1 and not pushed_files(workspace / "dvc-remote")


def test_a_local_override_of_ones_own_is_kept_and_said(clone, tmp_path: Path):
    workspace, env = clone
    run("make", "setup", cwd=workspace, env=env)
    mine = tmp_path / "my-own-storage"
    run("friction", "remote", "--local", str(mine), cwd=workspace, env=env)  # a person's deliberate choice
    shared = tmp_path / "team-storage"
    made = run("make", "remote", f"URL={shared}", cwd=workspace, env=env)
    assert f"`dvc push` here uses DVC remote 'storage': {mine}" in made.stderr
    assert "dvc remote remove --local storage" in made.stderr
    (workspace / "data/notes.txt").write_text("what the team shares")
    run("dvc", "add", "-q", "data/notes.txt", cwd=workspace, env=env)
    run("dvc", "push", cwd=workspace, env=env)
    assert len(pushed_files(mine)) == 1 and not pushed_files(shared)  # where it said

    run("dvc", "remote", "remove", "--local", "storage", cwd=workspace, env=env)  # what it said to run
    run("dvc", "push", cwd=workspace, env=env)
    assert len(pushed_files(shared)) == 1


def test_pull_from_a_remote_whose_plugin_is_missing_names_the_plugin(clone):
    workspace, env = clone
    run("make", "setup", cwd=workspace, env=env)
    run("make", "remote", "URL=s3://team-bucket/friction", cwd=workspace, env=env)
    result = subprocess.run(["friction", "pull"], cwd=workspace, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stderr
    assert "DVC remote 'storage' (s3://team-bucket/friction) needs DVC's s3 plugin (dvc-s3)" in result.stderr
    assert "pip install 'dvc[s3]==3.67.1'" in result.stderr  # dvc-s3 is not installed here
    assert "never pushed" not in result.stderr and "Traceback" not in result.stderr
