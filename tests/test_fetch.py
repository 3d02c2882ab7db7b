"""Tests of stages.fetch: local copies, the manifest, atomic output, and Hub datasets through the real HF cache.

The Hub tests run `friction fetch` in a subprocess whose HF_HOME is a temporary folder and HF_HUB_OFFLINE=1, so
huggingface_hub and datasets read their settings from a clean environment; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from conftest import REPO, friction_row, jsonl_bytes, reluctance_text

from stages import fetch
from stages.config import Params, load_params

COMMIT = "3f2c1b0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_params: Params) -> Path:
    """A scratch workspace holding the demo recipe's base model folder (a few small files, not a real model)."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / demo_params.model.base
    (base / "nested").mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "qwen2"}\n')
    (base / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (base / "nested" / "extra.txt").write_text("hello\n")
    return tmp_path


def test_local_sources_are_copied_byte_for_byte_and_pinned(workspace: Path, make_params: Callable) -> None:
    friction = jsonl_bytes([friction_row("1"), friction_row("2")]) + b"\n   \n" + b'{"broken": \n'
    reluctance = jsonl_bytes([{"text": reluctance_text("Help me?")}, b"\xff\xfe not utf-8"])
    reluctance = reluctance.rstrip(b"\n")  # last line without a newline still counts
    (workspace / "data/sources").mkdir(exist_ok=True)
    (workspace / "data/sources/fr.jsonl").write_bytes(friction)
    (workspace / "data/sources/re.jsonl").write_bytes(reluctance)
    params = make_params({"fr": "friction", "re": "reluctance"})

    fetch.run(params, Path("data/raw"))

    raw = workspace / "data/raw"
    assert sorted(p.name for p in raw.iterdir()) == ["fr.jsonl", "manifest.json", "re.jsonl"]
    assert (raw / "fr.jsonl").read_bytes() == friction
    assert (raw / "re.jsonl").read_bytes() == reluctance
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["sources"] == {
        "fr": {
            "location": "data/sources/fr.jsonl",
            "format": "friction",
            "requested_revision": None,
            "resolved_revision": None,
            "rows": 3,  # blank and whitespace-only lines are not rows; malformed ones are (mix drops them)
            "sha256": sha256(friction),
        },
        "re": {
            "location": "data/sources/re.jsonl",
            "format": "reluctance",
            "requested_revision": None,
            "resolved_revision": None,
            "rows": 2,
            "sha256": sha256(reluctance),
        },
    }


def test_local_base_model_is_hashed_per_file(workspace: Path, make_params: Callable, demo_params: Params) -> None:
    (workspace / "data/sources/fr.jsonl").write_bytes(jsonl_bytes([friction_row("1")]))
    fetch.run(make_params({"fr": "friction"}), Path("data/raw"))

    base = workspace / demo_params.model.base
    recorded = json.loads((workspace / "data/raw/manifest.json").read_text())["base_model"]
    assert recorded == {
        "location": demo_params.model.base,
        "requested_revision": None,
        "resolved_revision": None,
        "files": {
            "config.json": sha256((base / "config.json").read_bytes()),
            "model.safetensors": sha256((base / "model.safetensors").read_bytes()),
            "nested/extra.txt": sha256(b"hello\n"),
        },
    }


def test_base_model_change_changes_the_manifest(workspace: Path, make_params: Callable, demo_params: Params) -> None:
    (workspace / "data/sources/fr.jsonl").write_bytes(jsonl_bytes([friction_row("1")]))
    params = make_params({"fr": "friction"})
    fetch.run(params, Path("data/raw"))
    before = (workspace / "data/raw/manifest.json").read_bytes()
    fetch.run(params, Path("data/raw"))
    assert (workspace / "data/raw/manifest.json").read_bytes() == before  # a rerun replaces the output identically
    (workspace / demo_params.model.base / "model.safetensors").write_bytes(b"other weights")
    fetch.run(params, Path("data/raw"))
    assert (workspace / "data/raw/manifest.json").read_bytes() != before


def test_failing_source_leaves_no_output_behind(workspace: Path, make_params: Callable) -> None:
    (workspace / "data/sources/fr.jsonl").write_bytes(jsonl_bytes([friction_row("1")]))
    params = make_params({"fr": "friction", "gone": "reluctance"})  # data/sources/gone.jsonl does not exist

    with pytest.raises(click.ClickException, match=r"data\.sources\.gone\.path: data/sources/gone\.jsonl"):
        fetch.run(params, Path("data/raw"))
    assert sorted(p.name for p in (workspace / "data").iterdir()) == ["sources"]  # no raw/, no .raw.partial/


def test_missing_local_base_model_is_a_clear_error(workspace: Path, make_params: Callable, demo_params: Params) -> None:
    (workspace / "data/sources/fr.jsonl").write_bytes(jsonl_bytes([friction_row("1")]))
    for path in sorted((workspace / demo_params.model.base).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (workspace / demo_params.model.base).rmdir()

    with pytest.raises(click.ClickException, match=r"model\.base: .* is not a directory"):
        fetch.run(make_params({"fr": "friction"}), Path("data/raw"))
    assert sorted(p.name for p in (workspace / "data").iterdir()) == ["sources"]


# --- Hub datasets through the real huggingface_hub / datasets code, offline, in a subprocess ---------------------


def run_fetch_cli(workspace: Path, sources: dict, hf_home: Path) -> subprocess.CompletedProcess:
    """`friction fetch` in `workspace` with a params.yaml holding `sources` (JSON is YAML) and the demo base."""
    params = load_params(REPO / "recipes/demo.yaml").model_dump()
    params["data"]["sources"] = sources
    params["mix"]["weights"] = {name: 1 / len(sources) for name in sources}
    (workspace / "params.yaml").write_text(json.dumps(params, indent=2))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", "from stages.cli import main; main()", "fetch"],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=120,
    )


def put_in_hf_cache(hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
    """Lay out a dataset repo as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/main."""
    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / sha256(data)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_hub_dataset_not_in_cache_offline_fails_naming_it(workspace: Path, tmp_path_factory) -> None:
    hf_home = tmp_path_factory.mktemp("hf-empty")
    (workspace / "data/sources/fr.jsonl").write_bytes(jsonl_bytes([friction_row("1")]))
    sources = {
        "local": {"path": "data/sources/fr.jsonl", "format": "friction"},
        "hub": {"hub": "acme/friction-missing-v9", "revision": "main", "format": "friction"},
    }
    result = run_fetch_cli(workspace, sources, hf_home)

    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "'acme/friction-missing-v9'" in error, result.stderr
    assert "not in the local Hugging Face cache" in error
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (workspace / "data").iterdir()) == ["sources"]


def test_hub_dataset_in_cache_offline_is_loaded_and_pinned(workspace: Path, tmp_path_factory) -> None:
    hf_home = tmp_path_factory.mktemp("hf-cached")
    rows = [friction_row("1"), friction_row("2", answer="Café? 🙂 Sure."), friction_row("3")]
    put_in_hf_cache(hf_home, "acme/friction-tiny", {"data/train.jsonl": jsonl_bytes(rows), "README.md": b"# tiny\n"})
    sources = {"tiny": {"hub": "acme/friction-tiny", "revision": "main", "format": "friction"}}
    result = run_fetch_cli(workspace, sources, hf_home)

    assert result.returncode == 0, result.stderr
    manifest = json.loads((workspace / "data/raw/manifest.json").read_text())
    fetched = (workspace / "data/raw/tiny.jsonl").read_bytes()
    assert manifest["sources"]["tiny"] == {
        "location": "acme/friction-tiny",
        "format": "friction",
        "requested_revision": "main",
        "resolved_revision": COMMIT,
        "rows": 3,
        "sha256": sha256(fetched),
    }
    # Every field mix reads comes back unchanged. (Not `metadata`: datasets' JSON loader infers a timestamp type for
    # "2025-02-14 10:00:00" and to_json writes it back as epoch milliseconds.)
    used = ("id", "question", "agent_responses", "final_answer")
    assert [{key: row[key] for key in used} for row in map(json.loads, fetched.decode("utf-8").splitlines())] == [
        {key: row[key] for key in used} for row in rows
    ]
    assert "Café? 🙂" in fetched.decode("utf-8")  # written with force_ascii=False
