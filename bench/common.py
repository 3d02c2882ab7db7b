"""What the CPU benchmarks share: timing two things side by side, interleaved; a stage in a process of its own with
its peak memory; a scratch workspace of the demo; the machine and the versions a result was measured with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PACKAGES = ["torch", "transformers", "trl", "peft", "datasets", "tokenizers", "pyarrow", "numpy", "dvc"]


def stage_command(stage: str, **paths: Path | str) -> list[str]:
    """`friction <stage>` as this repository's dvc.yaml runs it, with `paths` replaced (see stage_argv)."""
    from friction.pipeline import stage_argv

    return stage_argv(stage, REPO / "dvc.yaml", **paths)


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of repeated measurements, and the raw values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def interleaved(runs: int, **variants: Callable[[], float]) -> dict[str, dict[str, Any]]:
    """Run every variant once per round, `runs` rounds, alternating which goes first (contention from other
    processes then hits both sides alike); each callable returns its measurement."""
    values: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_number in range(runs):
        for name in names if round_number % 2 == 0 else reversed(names):
            values[name].append(variants[name]())
    return {name: spread(measured) for name, measured in values.items()}


def ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> dict[str, Any]:
    """Ratio of two interleaved series: of their medians, and the range of the per-round ratios."""
    per_round = [a / b for a, b in zip(numerator["runs"], denominator["runs"], strict=True) if b]
    return {"median_ratio": numerator["median"] / denominator["median"], "min": min(per_round), "max": max(per_round)}


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_gib: float
    output: str


def run_measured(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 4 * 3600) -> Run:
    """Run a command in a process of its own: its wall time and peak resident memory (the kernel's maxrss of that
    process alone, through wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env={**bench_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            raise TimeoutError(f"{' '.join(command)}: over {timeout} s")
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed in {cwd}:\n{output[-3000:]}")
    return Run(seconds, usage.ru_maxrss / 2**20, output)


def bench_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }


def machine() -> dict[str, Any]:
    """The machine and software a result was measured with, and how busy the machine was."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    memory = Path("/proc/meminfo")
    total = (
        next(
            (int(line.split()[1]) / 2**20 for line in memory.read_text().splitlines() if line.startswith("MemTotal")),
            None,
        )
        if memory.exists()
        else None
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(total, 1) if total else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: importlib.metadata.version(name) for name in PACKAGES},
        "load_average": os.getloadavg(),
    }
