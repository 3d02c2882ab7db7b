"""Two clean runs of fetch, mix and pack on the demo recipe, in separate workspaces and processes with different hash
seeds, write byte-identical data: dvc.lock and every downstream stage see the same inputs again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

OUTPUTS = ["data/raw", "data/mixed", "data/packed", "metrics"]


def files_under(workspace: Path) -> dict[str, bytes]:
    return {
        path.relative_to(workspace).as_posix(): path.read_bytes()
        for output in OUTPUTS
        for path in sorted((workspace / output).rglob("*"))
        if path.is_file()
    }


def test_fetch_mix_pack_are_byte_identical_across_clean_runs(
    demo_pipeline: Path, demo_workspace: Callable[..., Path]
) -> None:
    second = demo_workspace("determinism", hash_seed="2")  # demo_pipeline ran with PYTHONHASHSEED=1
    first_files, second_files = files_under(demo_pipeline), files_under(second)

    expected = {
        "data/raw/manifest.json",
        "data/mixed/train.parquet",
        "data/mixed/validation.parquet",
        "data/mixed/dropped.jsonl",
        "data/packed/train.parquet",
        "data/packed/validation.parquet",
        "metrics/mix.json",
        "metrics/pack.json",
    }
    assert expected <= set(first_files)
    assert sorted(first_files) == sorted(second_files)
    differing = [name for name in first_files if first_files[name] != second_files[name]]
    assert not differing, f"outputs differ between two clean runs: {differing}"
