"""The demo-workspace builder replaces only folders it made."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from friction.demo import MARKER, build_workspace


def test_a_folder_it_did_not_make_is_refused_and_kept(tmp_path: Path, tiny_model_dir: Path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(click.ClickException, match="not empty and not a demo workspace"):
        build_workspace(notes, base=tiny_model_dir)
    assert [path.name for path in notes.iterdir()] == ["mine.txt"]


def test_its_own_workspace_is_replaced_whole(tmp_path: Path, tiny_model_dir: Path):
    workspace = build_workspace(tmp_path / "demo", base=tiny_model_dir)
    (workspace / "left-over.txt").write_text("from the last run")
    build_workspace(workspace, base=tiny_model_dir)
    assert (workspace / MARKER).is_file() and (workspace / "params.yaml").is_file()
    assert not (workspace / "left-over.txt").exists()
