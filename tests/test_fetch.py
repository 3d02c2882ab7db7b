"""Tests of stages.fetch: local copies, the manifest, atomic output, and Hub datasets through the real HF cache.

The Hub tests run `python -m stages fetch` (or `dvc repro`) in a subprocess whose HF_HOME is a temporary folder and
HF_HUB_OFFLINE=1, so huggingface_hub and datasets read their settings from a clean environment; nothing is mocked.
The tests of repos the Hub refuses go online to a local HTTP server that answers as the Hub does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
from conftest import REPO, friction_row, jsonl_bytes, reluctance_text

from friction.config import Params, load_params
from friction.pipeline import stage_argv
from stages import fetch

COMMIT = "3f2c1b0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
LATER_COMMIT = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b"
FAKE_TOKEN = "hf_FakeTokenThatMustNeverBeWritten0123456789"


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


def run_in(workspace: Path, hf_home: Path, command: list[str], **env: str) -> subprocess.CompletedProcess:
    """`command` in `workspace`, offline, with `hf_home` as the only Hugging Face settings and cache (and `env`)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    clean.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        command, cwd=workspace, env=clean | env, capture_output=True, text=True, timeout=120, check=False
    )


def write_params(workspace: Path, sources: dict) -> None:
    """A params.yaml holding `sources` (JSON is YAML) and the rest of the demo recipe (its local base model)."""
    params = load_params(REPO / "recipes/demo.yaml").model_dump()
    params["data"]["sources"] = sources
    params["mix"]["weights"] = {name: 1 / len(sources) for name in sources}
    (workspace / "params.yaml").write_text(json.dumps(params, indent=2))


def run_fetch_cli(workspace: Path, sources: dict, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    write_params(workspace, sources)
    return run_in(workspace, hf_home, [sys.executable, *stage_argv("fetch", REPO / "dvc.yaml")[1:]], **env)


def put_in_hf_cache(
    hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, repo_type: str = "dataset"
) -> None:
    """Lay out a commit of a repo as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/main.

    Called again with another commit, it moves `main` there, as a download after an upstream push does.
    """
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / sha256(data)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


class FakeHub(ThreadingHTTPServer):
    """A local stand-in for the Hub that refuses every repo as the Hub does: gated if its name says so, else 401
    RepoNotFound (the Hub's answer for private and missing repos alike). It notes the Authorization headers."""

    authorizations: set[str]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.server.authorizations.add(self.headers.get("Authorization", ""))
            gated = "gated" in self.path
            self.send_response(403 if gated else 401)
            self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    with FakeHub(("127.0.0.1", 0), FakeHub.Handler) as server:
        server.authorizations = set()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server
        server.shutdown()


@pytest.mark.parametrize(
    ("repo_id", "problem"),
    [("acme/private-or-gone", "was not found on the Hub. If it is private, "), ("acme/gated", "is gated: ")],
)
def test_unreadable_hub_dataset_names_it_and_the_remedies(
    workspace: Path, tmp_path_factory, fake_hub: FakeHub, repo_id: str, problem: str
) -> None:
    sources = {"hub": {"hub": repo_id, "revision": "main", "format": "friction"}}
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{fake_hub.server_port}", "HF_TOKEN": FAKE_TOKEN}
    result = run_fetch_cli(workspace, sources, tmp_path_factory.mktemp("hf-online"), **online)

    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: data.sources.hub.hub: dataset {repo_id!r} at revision 'main' {problem}"), error
    remedies = ["HF_TOKEN", "`hf auth login`", "`huggingface-cli login`", "remove or replace data.sources.hub in"]
    assert [remedy for remedy in remedies if remedy not in error] == []
    assert fake_hub.authorizations == {f"Bearer {FAKE_TOKEN}"}  # the token was used, and yet:
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_hub_dataset_not_in_cache_offline_fails_naming_it(workspace: Path, tmp_path_factory) -> None:
    hf_home = tmp_path_factory.mktemp("hf-empty")
    (workspace / "data/sources/fr.jsonl").write_bytes(jsonl_bytes([friction_row("1")]))
    sources = {
        "local": {"path": "data/sources/fr.jsonl", "format": "friction"},
        "hub": {"hub": "acme/friction-missing-v9", "revision": "main", "format": "friction"},
    }
    result = run_fetch_cli(workspace, sources, hf_home, HF_TOKEN=FAKE_TOKEN)

    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: data.sources.hub.hub: ") and "'acme/friction-missing-v9'" in error, result.stderr
    assert "not in the local Hugging Face cache" in error
    assert "Traceback" not in result.stderr
    assert FAKE_TOKEN not in result.stdout + result.stderr
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
    assert "data.sources.tiny.revision is 'main', a branch or tag" in result.stderr
    assert f"resolved to commit {COMMIT}. Run `friction pin`" in result.stderr


def test_token_is_never_written(workspace: Path, tmp_path_factory) -> None:
    hf_home = tmp_path_factory.mktemp("hf-token")
    put_in_hf_cache(hf_home, "acme/friction-tiny", {"data/train.jsonl": jsonl_bytes([friction_row("1")])})
    sources = {"tiny": {"hub": "acme/friction-tiny", "revision": "main", "format": "friction"}}
    result = run_fetch_cli(workspace, sources, hf_home, HF_TOKEN=FAKE_TOKEN)

    assert result.returncode == 0, result.stderr
    written = sorted(p for p in (workspace / "data/raw").rglob("*") if p.is_file())
    assert [p.name for p in written] == ["manifest.json", "tiny.jsonl"]
    assert not [p for p in written if FAKE_TOKEN.encode() in p.read_bytes()]
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_upstream_change_of_a_branch_is_warned_about(workspace: Path, tmp_path_factory) -> None:
    hf_home = tmp_path_factory.mktemp("hf-moving")
    put_in_hf_cache(hf_home, "acme/friction-tiny", {"data/train.jsonl": jsonl_bytes([friction_row("1")])})
    sources = {"tiny": {"hub": "acme/friction-tiny", "revision": "main", "format": "friction"}}
    assert run_fetch_cli(workspace, sources, hf_home).returncode == 0
    rows = [friction_row("1"), friction_row("2")]
    put_in_hf_cache(hf_home, "acme/friction-tiny", {"data/train.jsonl": jsonl_bytes(rows)}, commit=LATER_COMMIT)

    moved = run_fetch_cli(workspace, sources, hf_home)

    assert moved.returncode == 0, moved.stderr  # a warning, not a stop: the manifest and dvc.lock record the change
    assert (
        f"WARNING: data.sources.tiny.revision 'main' of acme/friction-tiny moved upstream: it was commit {COMMIT} "
        f"in the last fetch and is now {LATER_COMMIT}." in moved.stderr
    )
    assert f"set data.sources.tiny.revision: {COMMIT}" in moved.stderr
    manifest = json.loads((workspace / "data/raw/manifest.json").read_text())
    assert (manifest["sources"]["tiny"]["resolved_revision"], manifest["sources"]["tiny"]["rows"]) == (LATER_COMMIT, 2)

    pinned = run_fetch_cli(workspace, {"tiny": {**sources["tiny"], "revision": LATER_COMMIT}}, hf_home)
    assert pinned.returncode == 0, pinned.stderr
    warnings = [line for line in pinned.stderr.lower().splitlines() if "warning" in line]
    # A commit neither moves nor needs pinning; only an environment other than the lock's (the unsloth set's) warns.
    assert [line for line in warnings if "this environment differs from requirements/lock" not in line] == []


def test_upstream_change_is_warned_about_under_dvc_repro(workspace: Path, tmp_path_factory) -> None:
    """`dvc repro` deletes data/raw before fetch runs: the last manifest comes from DVC's cache."""
    hf_home = tmp_path_factory.mktemp("hf-dvc")
    put_in_hf_cache(hf_home, "acme/friction-tiny", {"data/train.jsonl": jsonl_bytes([friction_row("1")])})
    write_params(workspace, {"tiny": {"hub": "acme/friction-tiny", "revision": "main", "format": "friction"}})
    fetch_cmd = shlex.join([sys.executable, *stage_argv("fetch", REPO / "dvc.yaml")[1:]])
    stage = {"cmd": fetch_cmd, "params": ["data.sources", "model.base", "model.revision"], "outs": ["data/raw"]}
    (workspace / "dvc.yaml").write_text(json.dumps({"stages": {"fetch": stage}}))
    dvc = [sys.executable, "-m", "dvc"]
    no_analytics = {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path_factory.mktemp("dvc-site"))}
    assert run_in(workspace, hf_home, [*dvc, "init", "--no-scm", "-q"], **no_analytics).returncode == 0
    first = run_in(workspace, hf_home, [*dvc, "repro"], **no_analytics)
    assert first.returncode == 0, first.stdout + first.stderr
    later = {"data/train.jsonl": jsonl_bytes([friction_row("2")])}
    put_in_hf_cache(hf_home, "acme/friction-tiny", later, commit=LATER_COMMIT)

    forced = run_in(workspace, hf_home, [*dvc, "repro", "--force"], **no_analytics)

    assert forced.returncode == 0, forced.stdout + forced.stderr
    warning = f"WARNING: data.sources.tiny.revision 'main' of acme/friction-tiny moved upstream: it was commit {COMMIT}"
    assert warning in forced.stdout + forced.stderr
