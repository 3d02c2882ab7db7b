"""Shared fixtures of the stage tests: params built from recipes/demo.yaml, small hand-written rows, a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from friction.chatml import IGNORE_INDEX, IM_END, IM_START
from friction.config import Params, load_params
from friction.demo import build_workspace
from friction.pipeline import stage_argv

REPO = Path(__file__).resolve().parents[1]


def why_training_cannot_run_here() -> str | None:
    """Why TRL cannot train on this machine; None where it can.

    TRL 1.15 (the unsloth set's pin) computes the loss with a fused LM head whose kernels import triton, which only
    CUDA builds of torch ship; TRL 1.16 falls back to torch where triton is missing. So on a CPU the tests that train
    run under the project's pins and are skipped under the unsloth set's, with this reason.
    """
    from importlib.metadata import version

    trl = version("trl")
    if Version(trl) < Version("1.16") and importlib.util.find_spec("triton") is None:
        return f"trains with trl {trl}, whose fused LM head imports triton, and this torch (a CPU build) has none"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = why_training_cannot_run_here()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("needs_triton"):
            item.add_marker(pytest.mark.skip(reason=reason))


SYSTEM_PROMPT = "You are a human-like AI assistant."


def friction_row(
    row_id: str,
    question: str = "I keep thinking I should quit my job but",
    thoughts: tuple[str, ...] = ("They sound tired.", "Last time this came up, money mattered.", "Maybe not yet?"),
    answer: str = "That sounds heavy. What would you miss if you left?",
) -> dict[str, Any]:
    """A row in the friction-* schema (original-recipe.md section 2); `row_id` also makes its text unique."""
    agents = ["problem_framer", "memory_activator", "mechanism_explorer", "perspective_generator", "synthesizer"]
    return {
        "id": row_id,
        "question": f"{question} ({row_id})",
        "agent_responses": [
            {"agent_type": agent, "thought_stream": thought, "friction_moments": []}
            for agent, thought in zip(agents, thoughts)
        ],
        "final_answer": answer,
        "metadata": {"timestamp": "2025-02-14 10:00:00", "model": "test"},
    }


def reluctance_text(user: str, judging: str = "Is this safe for them?", answer: str = "I'd rather not, but...") -> str:
    return (
        f"{IM_START}system\nYou are careful.\n{IM_END}\n"
        f"{IM_START}user\n{user}\n{IM_END}\n"
        f"{IM_START}assistant\n<judging>\n{judging}\n</judging>\n{answer}\n{IM_END}\n"
    )


def jsonl_bytes(rows: list[Any]) -> bytes:
    """JSON Lines: dicts are dumped, str and bytes are written as the raw line (for malformed rows)."""
    lines = []
    for row in rows:
        if isinstance(row, bytes):
            lines.append(row)
        elif isinstance(row, str):
            lines.append(row.encode("utf-8"))
        else:
            lines.append(json.dumps(row, ensure_ascii=False).encode("utf-8"))
    return b"".join(line + b"\n" for line in lines)


@pytest.fixture(scope="session")
def demo_params() -> Params:
    return load_params(REPO / "recipes/demo.yaml")


@pytest.fixture
def make_params(demo_params: Params) -> Callable[..., Params]:
    """Params of the demo recipe with other sources (name -> format, or name -> full source dict) and mix settings.

    The result is validated again, so the same rules as for params.yaml apply.
    """

    def build(sources: dict[str, Any], weights: dict[str, float] | None = None, **mix: Any) -> Params:
        raw = demo_params.model_dump()
        raw["data"]["sources"] = {
            name: spec if isinstance(spec, dict) else {"path": f"data/sources/{name}.jsonl", "format": spec}
            for name, spec in sources.items()
        }
        raw["mix"]["weights"] = weights or {name: 1 / len(sources) for name in sources}
        raw["mix"].update(mix)
        return Params.model_validate(raw)

    return build


TINY_CORPUS = [
    "I keep thinking I should quit my job but I'm scared of what comes next.",
    "My sister never calls me back, and honestly I don't know if I even care anymore...",
    "Maybe, perhaps, I wonder whether the plan could work. I'm not sure it might.",
    "The quick brown fox jumps over the lazy dog; 12 foxes, 345 dogs, 6789 cats.",
    "I disagree. I have to respectfully push back on that, because the numbers don't add up.",
    "What would you miss if you left? Who would you talk to first? Why now?",
    "café naïve résumé — it's fine, we'll see; they're here (mostly) [ok] {yes}.",
    f"{IM_START}system\n{SYSTEM_PROMPT}\n{IM_END}\n",
    f"{IM_START}user\nShould I text him tonight?\n{IM_END}\n",
    f"{IM_START}assistant\n<think>\nThey sound tired.\n\nMaybe not yet?\n</think>\nWait until morning.\n{IM_END}\n",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 model whose BPE (~500 tokens) is trained on the sentences above."""
    from friction.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model") / "base"
    build_tiny_model(TINY_CORPUS * 4, out, tokenizer_vocab_size=500)
    return out


@pytest.fixture(scope="session")
def real_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe's base tokenizer with its real ids (tests/real_tokenizer.py), built once a session (~5 s)."""
    from real_tokenizer import build_base_tokenizer

    return build_base_tokenizer(tmp_path_factory.mktemp("real-base"))


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Callable[..., Path]:
    """Make a fresh workspace (the demo recipe, its bundled sources, the tiny model as demo-base) and run pipeline
    stages there, each as its own `friction` process with dvc.yaml's command line, with the given PYTHONHASHSEED."""

    def make(name: str, stages: tuple[str, ...] = ("fetch", "mix", "pack"), hash_seed: str = "0") -> Path:
        workspace = build_workspace(tmp_path_factory.mktemp(name), base=tiny_model_dir)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONHASHSEED": hash_seed,
            "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}",
        }
        for stage in stages:
            result = subprocess.run(
                stage_argv(stage, REPO / "dvc.yaml"),
                cwd=workspace,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, f"friction {stage} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        return workspace

    return make


@pytest.fixture(scope="session")
def demo_pipeline(demo_workspace: Callable[..., Path]) -> Path:
    """A demo workspace after `python -m stages fetch`, `python -m stages mix` and `python -m stages pack`; tests read it, never write it."""
    return demo_workspace("demo-pipeline", hash_seed="1")


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of trained (non-ignored) labels."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def isolated_env(root: Path) -> dict[str, str]:
    """The environment of a subprocess that may write only under `root`: its own HOME, XDG folders, DVC site cache,
    Hugging Face home and temporary folder; offline; this checkout's .venv first on PATH."""
    folders = {
        name: root / name.lower()
        for name in (
            "HOME",
            "XDG_CONFIG_HOME",
            "XDG_CACHE_HOME",
            "XDG_DATA_HOME",
            "DVC_SITE_CACHE_DIR",
            "HF_HOME",
            "TMPDIR",
        )
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_", "GIT_"))}
    return {
        **clean,
        **{name: str(folder) for name, folder in folders.items()},
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.fixture(scope="session")
def made_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, str]]:
    """`make demo` once for the session, in a temporary folder with its own HOME and default DVC remote:
    (the demo workspace, make's output, the environment it ran in). Tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("made-demo")
    env = isolated_env(root / "env")
    workspace = root / "demo"
    result = subprocess.run(
        ["make", "demo", f"DEMO_DIR={workspace}", f"DEFAULT_REMOTE={root / 'default-remote'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"make demo failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return workspace, result.stdout + result.stderr, env


@pytest.fixture
def demo_copy(made_demo: tuple[Path, str, dict[str, str]], tmp_path: Path) -> Path:
    """A copy of the made demo (its git history and DVC cache too) that a test may change."""
    copy = tmp_path / "demo"
    shutil.copytree(made_demo[0], copy, symlinks=True)
    return copy


@pytest.fixture(scope="session")
def exported_demo(demo_workspace: Callable[..., Path]) -> tuple[Path, str]:
    """A demo workspace whose adapter trained 4 steps, put where card publishes it and exported with dvc.yaml's
    `python -m stages export` command line: (the workspace, the export's output). Tests read it, never write it."""
    from ruamel.yaml import YAML

    workspace = demo_workspace("exported-demo")
    yaml = YAML()
    params = yaml.load(workspace / "params.yaml")
    params["train"]["max_steps"], params["train"]["eval_steps"] = 4, 100  # a short run: the adapter's numbers matter
    yaml.dump(params, workspace / "params.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    train = subprocess.run(
        stage_argv("train", REPO / "dvc.yaml"), cwd=workspace, env=env, capture_output=True, text=True, check=False
    )
    assert train.returncode == 0, f"train failed:\n{train.stdout[-3000:]}{train.stderr[-3000:]}"
    # What the card stage publishes, without evaluate's minutes: the trained adapter folder as it is.
    shutil.copytree(workspace / "models/adapter", workspace / "models/friction-adapter")
    export = subprocess.run(
        stage_argv("export", REPO / "dvc.yaml"), cwd=workspace, env=env, capture_output=True, text=True, check=False
    )
    assert export.returncode == 0, f"export failed:\n{export.stdout[-3000:]}{export.stderr[-3000:]}"
    return workspace, export.stdout + export.stderr
