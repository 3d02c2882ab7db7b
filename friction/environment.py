"""The Python environment a stage runs in, against the lock file `make setup` installs.

requirements/lock.txt pins every package of the CPU set with its hashes, requirements/lock-cuda.txt the CUDA set
(`make lock` writes both with uv). Each stage records the lock's digest and the versions that decide its outputs in
its metrics, and warns, naming the packages, when what is installed is not what the lock says: such a run may not
reproduce the committed outputs. Both lock files are dependencies of every stage in dvc.yaml, so a new lock reruns
the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
CPU_LOCK, CUDA_LOCK = REQUIREMENTS / "lock.txt", REQUIREMENTS / "lock-cuda.txt"
RECORDED = ("torch", "transformers", "trl", "peft", "tokenizers", "datasets", "accelerate")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def lock_in_use() -> Path:
    """The CUDA lock where torch is a CUDA build (no `+cpu` local version), else the CPU lock."""
    torch = installed("torch")
    return CUDA_LOCK if torch is not None and "+cpu" not in torch else CPU_LOCK


def locked_versions(lock: Path) -> dict[str, str]:
    return {normalised(found[1]): found[2] for line in lock.read_text().splitlines() if (found := PIN.match(line))}


def differences(lock: Path) -> dict[str, str]:
    """Each locked package whose installed version is another: name -> "installed X, lock Y"."""
    found = {}
    for name, locked in sorted(locked_versions(lock).items()):
        current = installed(name)
        if current != locked:
            found[name] = f"installed {current or 'none'}, lock {locked}"
    return found


def record(stage: str) -> dict:
    """What a stage's metrics keep about its environment; warns on stderr when it is not the lock's."""
    lock = lock_in_use()
    if not lock.is_file():
        click.echo(f"{stage}: warning: no {lock.name} beside this code; the run's environment is not checked", err=True)
        return {"lock": None, "versions": recorded_versions()}
    differ = differences(lock)
    if differ:
        listed = "; ".join(f"{name} ({what})" for name, what in differ.items())
        click.echo(
            f"{stage}: warning: this environment differs from requirements/{lock.name}, so the outputs may differ from "
            f"the committed ones: {listed}. `make setup` installs the lock.",
            err=True,
        )
    return {
        "lock": f"requirements/{lock.name}",
        "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
        "versions": recorded_versions(),
        "differs_from_lock": differ,
    }


def recorded_versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{name: installed(name) for name in RECORDED}}


def write_into(metrics_path: Path, recorded: dict) -> None:
    """Add `recorded` under "environment" to the metrics file a stage has just written."""
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["environment"] = recorded
    scratch = metrics_path.with_name(f".{metrics_path.name}.partial")
    scratch.write_text(json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    scratch.replace(metrics_path)
