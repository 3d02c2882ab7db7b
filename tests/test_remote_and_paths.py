"""Where paths and the DVC remote are written: dvc.yaml's command lines and artifact, and the remote's URL."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import pytest

from conftest import REPO
from friction.commands import remote
from friction.pipeline import artifact_path, stage_argv


def test_stages_take_their_paths_from_dvc_yaml_only():
    dvc_yaml = REPO / "dvc.yaml"
    assert artifact_path(path=dvc_yaml) == Path("models/friction-adapter")
    assert stage_argv("card", dvc_yaml)[-2:] == ["--out", "models/friction-adapter"]
    assert stage_argv("mix", dvc_yaml)[:6] == ["python", "-m", "stages", "mix", "--raw", "data/raw"]
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    missing = subprocess.run(["python", "-m", "stages", "mix"], cwd=REPO, env=env, capture_output=True, text=True, check=False)
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
