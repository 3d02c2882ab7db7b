"""Reading and writing the pipeline's artifacts: atomic outputs, JSON, hashes, and the fetched base model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a scratch path beside `target`; move it into place only if the block succeeds.

    A stage that fails halfway leaves neither a partial output nor the scratch path behind.
    """
    scratch = target.with_name(f".{target.name}.partial")
    _remove(scratch)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield scratch
    except BaseException:
        _remove(scratch)
        raise
    _remove(target)
    scratch.rename(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise click.ClickException(f"{path}: missing; run the stage that writes it (dvc repro)") from None
    except json.JSONDecodeError as error:
        raise click.ClickException(f"{path}: not valid JSON ({error})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


RAW_MANIFEST = Path("data/raw/manifest.json")


def base_model_reference(manifest_path: Path = RAW_MANIFEST) -> tuple[str, str | None]:
    """The base model as fetch pinned it: (Hub id or local directory, commit or None)."""
    manifest = read_json(manifest_path)
    base = manifest.get("base_model") if isinstance(manifest, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("location"), str) or "resolved_revision" not in base:
        raise click.ClickException(
            f"{manifest_path}: no base_model with its location and resolved_revision; rerun fetch (dvc repro fetch)"
        )
    return base["location"], base["resolved_revision"]
