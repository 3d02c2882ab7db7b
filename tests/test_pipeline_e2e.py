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
STAGES = ["fetch", "mix", "pack", "train", "evaluate", "card"]

pytestmark = pytest.mark.e2e


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
def demo(tmp_path_factory) -> tuple[Path, str]:
    workspace = tmp_path_factory.mktemp("e2e") / "demo"
    output = sh("make", "demo", f"DEMO_DIR={workspace}", cwd=REPO)
    return workspace, output


def test_demo_runs_every_stage_in_order(demo):
    workspace, output = demo
    assert stages_run(output) == STAGES
    assert f"{workspace}/models/adapter/README.md" in output  # make demo ends by saying where things are
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
    assert metrics["evaluate"]["friction"]["prompts"] == 24
    samples = [json.loads(line) for line in (workspace / "data/eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and all(s["adapter_response"] for s in samples)

    card = ModelCard.load(workspace / "models/adapter/README.md")
    assert card.data.base_model == "data/sources/demo-base"
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert f"{metrics['train']['final_train_loss']:.4f}" in card.text


def test_adapter_loads_onto_the_base_and_generates(demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workspace, _ = demo
    base = AutoModelForCausalLM.from_pretrained(workspace / "data/sources/demo-base")
    model = PeftModel.from_pretrained(base, workspace / "models/adapter")
    tokenizer = AutoTokenizer.from_pretrained(workspace / "models/adapter")
    messages = [{"role": "user", "content": "I think I should repaint the whole house this weekend."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_reproduce_again_is_a_no_op(demo):
    workspace, _ = demo
    assert json.loads(sh("dvc", "status", "--json", cwd=workspace)) == {}
    assert stages_run(sh("dvc", "repro", cwd=workspace)) == []


def test_param_changes_rerun_only_downstream_stages(demo):
    workspace, _ = demo
    set_param(workspace, "evaluate.max_new_tokens", 24)
    assert stages_run(sh("dvc", "repro", cwd=workspace)) == ["evaluate", "card"]
    set_param(workspace, "lora.rank", 4)
    assert stages_run(sh("dvc", "repro", cwd=workspace)) == ["train", "evaluate", "card"]
    assert json.loads(sh("dvc", "status", "--json", cwd=workspace)) == {}
