"""Tests of `friction pin`: branches resolved to commits through the real Hugging Face cache, params.yaml edited.

Like the Hub tests of fetch, `friction pin` runs in a subprocess whose HF_HOME is a temporary folder; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_fetch import put_in_hf_cache, run_in

from friction.commands import pin
from friction.config import Params, load_params
from friction.hub import hub_repos

FRICTION = [sys.executable, "-m", "friction"]  # the `friction` command of the Python that runs the tests

OLD_COMMIT = "0" * 40


def commit_of(repo_id: str) -> str:
    """A distinct, made-up commit for each repo."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def with_commits(text: str) -> str:
    """`text` with each `revision: main` line set to the commit of the repo named on the line above it."""
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.strip() == "revision: main":
            repo_id = lines[number - 1].split(":", 1)[1].strip()
            lines[number] = line.replace("main", commit_of(repo_id))
    return "".join(lines)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A workspace holding the repository's params.yaml: comments, a Hub base model and Hub sources on `main`."""
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def cache_every_hub_repo(hf_home: Path, params: Params, leave_out: str | None = None) -> None:
    for repo in hub_repos(params):
        if repo.repo_id != leave_out:
            put_in_hf_cache(hf_home, repo.repo_id, {"config.json": b"{}\n"}, commit_of(repo.repo_id), repo.repo_type)


def test_offline_pin_resolves_branches_from_the_cache_and_keeps_the_layout(workspace: Path, tmp_path: Path) -> None:
    original = (workspace / "params.yaml").read_text()
    params = load_params(workspace / "params.yaml")
    assert len(hub_repos(params)) >= 2 and original.count("revision: main") == len(hub_repos(params))
    # One source leaves its revision to the default ("main"): pin writes the line right after its `hub`.
    last_source = hub_repos(params)[-1]
    defaulted = original.replace(f"{last_source.repo_id}\n      revision: main\n", f"{last_source.repo_id}\n", 1)
    assert defaulted != original
    (workspace / "params.yaml").write_text(defaulted)
    hf_home = tmp_path / "hf"
    cache_every_hub_repo(hf_home, params)
    # The last fetch got another commit of the model's `main` than the cache now has: pinning changes the model.
    base = {"location": params.model.base, "requested_revision": "main", "resolved_revision": OLD_COMMIT}
    (workspace / "data/raw").mkdir(parents=True)
    (workspace / "data/raw/manifest.json").write_text(json.dumps({"sources": {}, "base_model": base}))

    result = run_in(workspace, hf_home, [*FRICTION, "pin"])

    assert result.returncode == 0, result.stderr
    assert (workspace / "params.yaml").read_text() == with_commits(original)  # comments, order, flow lists, nulls
    for repo in hub_repos(params):
        assert f"pin: {repo.revision_key}: main -> {commit_of(repo.repo_id)}\n" in result.stdout
    assert f"pin: warning: model.revision: the last fetch got commit {OLD_COMMIT}, but 'main' is now " in result.stderr
    assert f"set model.revision: {OLD_COMMIT} instead" in result.stderr and result.stderr.count("warning") == 1
    again = run_in(workspace, hf_home, [*FRICTION, "pin"])
    assert again.returncode == 0 and "nothing to pin" in again.stdout, again.stderr
    assert (workspace / "params.yaml").read_text() == with_commits(original)


def test_offline_pin_of_a_repo_missing_from_the_cache_names_its_key(workspace: Path, tmp_path: Path) -> None:
    params = load_params(workspace / "params.yaml")
    missing = hub_repos(params)[-1]
    hf_home = tmp_path / "hf"
    cache_every_hub_repo(hf_home, params, leave_out=missing.repo_id)
    before = (workspace / "params.yaml").read_bytes()

    result = run_in(workspace, hf_home, [*FRICTION, "pin"])

    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: {missing.revision_key}: dataset {missing.repo_id!r} at revision 'main'"), error
    assert "is not in the local Hugging Face cache" in error and "Traceback" not in result.stderr
    assert (workspace / "params.yaml").read_bytes() == before  # nothing written, not even the repos that resolved


def test_pin_without_the_hub_says_so(workspace: Path, tmp_path: Path) -> None:
    before = (workspace / "params.yaml").read_bytes()
    # Online mode, with an endpoint nothing listens on: a real connection failure, without the network.
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_in(workspace, tmp_path / "hf", [*FRICTION, "pin"], **online)

    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: model.base: ") and "cannot reach the Hub" in error, result.stderr
    assert "HF_HUB_OFFLINE=1" in error and "Traceback" not in result.stderr
    assert (workspace / "params.yaml").read_bytes() == before


def test_local_sources_and_models_have_nothing_to_pin(tmp_path: Path, make_params, capsys) -> None:
    recipe = tmp_path / "params.yaml"
    shutil.copyfile(REPO / "recipes/demo.yaml", recipe)
    mixed = make_params({"local": "friction", "hub": {"hub": "acme/x", "revision": "v1", "format": "friction"}})
    assert [repo.revision_key for repo in hub_repos(mixed)] == ["data.sources.hub.revision"]

    pin.run(load_params(recipe), recipe)  # the demo recipe: a local base model and local sources only

    assert "nothing to pin" in capsys.readouterr().out
    assert recipe.read_bytes() == (REPO / "recipes/demo.yaml").read_bytes()
