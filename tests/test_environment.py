"""The environment against the lock: `make setup` installs exactly requirements/lock.txt, and a stage run in another
environment says which packages differ and records what it ran with."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest
from conftest import REPO

from friction import environment

PACKAGING_TOOLS = {"pip", "setuptools", "wheel"}  # the venv's own, unless the lock pins them too


def installed_distributions(locked: dict[str, str]) -> dict[str, str]:
    """What pip installed into this venv's site-packages (not what setuptools vendors and puts on sys.path)."""
    site_packages = sysconfig.get_paths()["purelib"]
    found = {
        environment.normalised(dist.metadata["Name"]): dist.version for dist in distributions(path=[site_packages])
    }
    unlocked_tools = PACKAGING_TOOLS - locked.keys()
    return {name: version for name, version in found.items() if name not in unlocked_tools | {"friction"}}


@pytest.mark.skipif(sys.prefix != str(REPO / ".venv"), reason="checks the venv `make setup` made")
def test_make_setup_installed_exactly_the_lock():
    locked = environment.locked_versions(REPO / "requirements/lock.txt")
    assert installed_distributions(locked) == locked
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout


def test_every_locked_line_is_pinned_with_a_hash():
    for lock in (environment.CPU_LOCK, environment.CUDA_LOCK):
        text = lock.read_text()
        pinned = environment.locked_versions(lock)
        assert len(pinned) > 100 and {"torch", "transformers", "trl", "peft", "tokenizers"} <= pinned.keys()
        assert text.count("==") == len(pinned) and text.count("--hash=sha256:") >= len(pinned), lock.name
    assert environment.locked_versions(environment.CPU_LOCK)["torch"].endswith("+cpu")
    assert "+" not in environment.locked_versions(environment.CUDA_LOCK)["torch"]  # PyPI's CUDA build


def test_a_stage_in_another_environment_warns_naming_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    lock = tmp_path / "lock.txt"
    pinned = environment.locked_versions(environment.CPU_LOCK)
    lock.write_text(
        f"transformers==0.0.1 \\\n    --hash=sha256:{'0' * 64}\n"
        f"peft=={pinned['peft']} \\\n    --hash=sha256:{'1' * 64}\n"
        "not-a-real-package==1.0\n"
    )
    monkeypatch.setattr(environment, "lock_in_use", lambda: lock)
    differ = environment.record("mix")["differs_from_lock"]
    assert differ == {
        "transformers": f"installed {environment.installed('transformers')}, lock 0.0.1",
        "not-a-real-package": "installed none, lock 1.0",
    }  # peft, at the locked version, is not named
    warning = capsys.readouterr().err
    assert "mix: warning: this environment differs from requirements/lock.txt" in warning
    assert "transformers (installed" in warning and "not-a-real-package (installed none, lock 1.0)" in warning


def test_a_stage_records_the_lock_digest_and_the_versions(tmp_path: Path):
    recorded = environment.record("pack")
    assert recorded["lock"] == "requirements/lock.txt" and len(recorded["lock_sha256"]) == 64
    assert set(environment.RECORDED) <= recorded["versions"].keys()
    metrics = tmp_path / "pack.json"
    metrics.write_text('{"rows": 3}')
    environment.write_into(metrics, recorded)
    assert json.loads(metrics.read_text()) == {"rows": 3, "environment": recorded}
