"""The whole pipeline on the demo recipe: `make demo` in a scratch copy, then what a user relies on afterwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
STAGES = ["fetch", "mix", "pack", "train", "evaluate", "judge", "card", "export"]

pytestmark = [pytest.mark.e2e, pytest.mark.needs_triton]  # the demo's pipeline trains with TRL


def sh(*args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def set_param(workspace: Path, dotted: str, value) -> None:
    yaml = YAML()
    path = workspace / "params.yaml"
    params = yaml.load(path)
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    yaml.dump(params, path)


@pytest.fixture(scope="module")
def demo(made_demo) -> tuple[Path, str]:
    """The session's `make demo`; these tests change its params last, after the ones that read it."""
    workspace, output, _ = made_demo
    return workspace, output


def test_demo_runs_every_stage_in_order(demo):
    workspace, output = demo
    assert stages_run(output) == STAGES
    assert f"{workspace}/models/friction-adapter/" in output  # make demo ends by saying where things are
    dag = sh("dvc", "dag", "--dot", cwd=workspace)
    for upstream, downstream in zip(STAGES, STAGES[1:]):
        assert f'"{upstream}" -> "{downstream}"' in dag


def test_demo_leaves_the_card_recipe_in_params_yaml(demo):
    assert "DeepSeek-R1-Distill-Qwen-7B" in (REPO / "params.yaml").read_text()
    assert "demo-base" in (demo[0] / "params.yaml").read_text()


def test_outputs_are_valid(demo):
    workspace, _ = demo
    metrics = {name: json.loads((workspace / f"metrics/{name}.json").read_text()) for name in STAGES[1:5]}
    assert metrics["train"]["best_eval_loss"] < metrics["evaluate"]["validation"]["base_loss"]
    friction = metrics["evaluate"]["friction"]
    assert friction["prompts"] == 20 and friction["samples_per_prompt"] == 2  # recipes/demo.yaml
    assert set(friction["categories"]) == {"dubious_claim", "risky_plan", "emotional", "factual", "control"}
    samples = [json.loads(line) for line in (workspace / "data/eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40 and all(s["adapter_response"] for s in samples)
    assert metrics["evaluate"]["comparison"]["answer_pushback_rate"]["n"] == 20
    # The demo needs no judge server: the stage ran and said it was off.
    assert json.loads((workspace / "metrics/judge.json").read_text())["enabled"] is False

    card = ModelCard.load(workspace / "models/friction-adapter/README.md")
    assert card.data.base_model == "data/sources/demo-base"
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert f"{metrics['train']['final_train_loss']:.4f}" in card.text
    assert "| metric | base | base + adapter | difference [95 % CI] | p | p (Holm) | n |" in card.text
    assert "**Over-friction** (lower is better)" in card.text and "| control | " in card.text


def test_make_compare_shows_each_difference_with_its_interval(demo):
    workspace, _ = demo
    # --md: the whole table (the terminal table is cut at the terminal's width)
    table = sh(
        "make", "-s", "-f", str(REPO / "Makefile"), "compare", f"VENV={REPO / '.venv'}", "ARGS=--md", cwd=workspace
    )
    for name in ("validation_loss", "answer_pushback_rate", "control_overfriction_rate"):
        for column in ("diff", "ci95_low", "ci95_high", "p_holm"):  # DVC leaves the list ci95 out: its two ends
            assert f"comparison.{name}.{column}" in table, table


def test_adapter_loads_onto_the_base_and_generates(demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workspace, _ = demo
    base = AutoModelForCausalLM.from_pretrained(workspace / "data/sources/demo-base")
    model = PeftModel.from_pretrained(base, workspace / "models/friction-adapter")
    tokenizer = AutoTokenizer.from_pretrained(workspace / "models/friction-adapter")
    messages = [{"role": "user", "content": "I think I should repaint the whole house this weekend."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_demo_commits_its_baseline_run_and_keeps_checkpoints_out_of_git(demo):
    workspace, _ = demo
    assert sh("git", "status", "--porcelain", cwd=workspace) == ""
    tracked = sh("git", "ls-files", cwd=workspace).splitlines()
    assert {"dvc.lock", "metrics/train.json", "metrics/evaluate.json", "data/sources/demo-base.dvc"} <= set(tracked)
    assert (workspace / "models/checkpoints").is_dir()
    in_git = [path for path in tracked if path.startswith(("models/", "data/sources/demo-base/"))]
    assert in_git == ["models/.gitignore"]  # DVC's list of its outputs there; checkpoints are ignored from the root
    artifact = workspace / "models/friction-adapter"
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "loss_curves.png",
    } <= {path.name for path in artifact.iterdir()}
    exported = workspace / "models/friction-gguf"  # the friction-adapter-gguf artifact
    assert {path.name for path in exported.iterdir()} == {
        "friction-lora-f16.gguf",
        "Modelfile",
        "chat_template.jinja",
        "README.md",
    }


def test_reproduce_again_is_a_no_op(demo):
    workspace, _ = demo
    assert json.loads(sh("dvc", "status", "--json", cwd=workspace)) == {}
    assert stages_run(sh("dvc", "repro", cwd=workspace)) == []


def test_param_changes_rerun_only_downstream_stages(demo_copy):
    workspace = demo_copy
    set_param(workspace, "evaluate.max_new_tokens", 24)
    assert stages_run(sh("dvc", "repro", cwd=workspace)) == ["evaluate", "judge", "card", "export"]
    set_param(workspace, "lora.rank", 4)
    assert stages_run(sh("dvc", "repro", cwd=workspace)) == ["train", "evaluate", "judge", "card", "export"]
    assert json.loads(sh("dvc", "status", "--json", cwd=workspace)) == {}


def test_a_code_change_shows_in_dvc_status_for_the_stages_that_import_it_and_only_those(demo_copy):
    """A changed default in the config module (imported by every stage), or a change in the token module, shows in
    `dvc status` for exactly the stages whose code imports it (dvc.yaml's deps, which tests/test_stage_deps.py
    checks against the imports)."""
    workspace = demo_copy
    declared = YAML(typ="safe").load((workspace / "dvc.yaml").read_text())["stages"]
    edits = {
        "friction/config.py": (
            'Literal["examples", "tokens"] = "examples"',
            'Literal["examples", "tokens"] = "tokens"',
        ),
        "friction/tokens.py": ("def encode_texts(", "def encode_texts(  "),
    }
    for module, (old, new) in edits.items():
        importers = {stage for stage, spec in declared.items() if module in spec.get("deps", [])}
        assert importers == set(STAGES) if module.endswith("config.py") else {"mix", "train"} <= importers < set(STAGES)
        path = workspace / module
        original = path.read_text()
        assert old in original, f"{module} no longer has {old!r}: update this test"
        path.write_text(original.replace(old, new))
        assert set(json.loads(sh("dvc", "status", "--json", cwd=workspace))) == importers, module
        path.write_text(original)
    assert json.loads(sh("dvc", "status", "--json", cwd=workspace)) == {}
