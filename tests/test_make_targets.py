"""The Makefile's install targets: none of them silently puts one pin set back over the other."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import REPO


def make(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_extras_are_installed_beside_the_installed_packages_never_over_them(tmp_path: Path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "lock").write_text("requirements/lock.txt")
    (venv / ".installed-lock").touch()  # an environment made by make setup (newer than pyproject.toml and the lock)
    for target, extra in (("cuda", "cuda"), ("flash-attention-4", "flash-attention-4")):
        planned = make("-n", target, f"VENV={venv}").stdout
        installs = [line for line in planned.splitlines() if "pip install" in line]
        assert len(installs) == 1, planned
        assert f"-c {venv}/installed-constraints.txt" in installs[0]  # every installed version stays as it is
        assert f"['optional-dependencies'][sys.argv[1]])\" {extra})" in installs[0]  # the extra's own packages
        assert "-e " not in installs[0]  # pip install -e '.[extra]' would reinstall the project's own pins


def test_setup_after_make_unsloth_refuses_to_reinstall_the_projects_pins(tmp_path: Path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".unsloth").touch()  # what make unsloth leaves; no .installed: make setup would reinstall the project
    result = make("setup", f"VENV={venv}")
    assert result.returncode == 2
    assert "holds the unsloth set (make unsloth)" in result.stdout and "make setup unsloth" in result.stdout
    assert sorted(path.name for path in venv.iterdir()) == [".unsloth"]  # stopped before anything was installed


def test_the_unsloth_env_takes_exactly_the_unsloth_sets_four_portable_pins():
    planned = make("-n", "unsloth-env", "UNSLOTH_VENV=/nonexistent/venv-unsloth").stdout
    pins = "transformers==5.17.0 trl==1.15.0 datasets==4.8.5 huggingface-hub==1.33.0"
    lines = planned.splitlines()
    steps = (
        "--require-hashes --no-deps -r requirements/lock.txt",
        "install --quiet --no-deps -e .",
        f"install --quiet {pins}",
    )
    order = [next(i for i, line in enumerate(lines) if step in line) for step in steps]
    assert order == sorted(order), planned  # the CPU lock first, then the project, then the pins over its own
    unsloth_txt = (REPO / "requirements/unsloth.txt").read_text().splitlines()
    assert all(pin in unsloth_txt for pin in pins.split())
