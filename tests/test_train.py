"""train: a run killed midway resumes from its last complete checkpoint and ends exactly where an unbroken run does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import click
import pytest
import torch
from ruamel.yaml import YAML
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from friction import training
from friction.chatml import IM_END
from friction.modeling import device_name
from friction.pipeline import stage_argv
from friction.training import LiveLog, StepTimer, packed_datasets, resumable_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, EVAL_STEPS = 24, 4


def friction(stage: str, cwd: Path) -> subprocess.Popen:
    """The stage's command line from dvc.yaml, as dvc repro runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    return subprocess.Popen(
        stage_argv(stage, REPO / "dvc.yaml"), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def packed_workspace(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A workspace holding the demo recipe's packed data, with a short training schedule."""
    workspace = tmp_path_factory.mktemp("train") / "packed"
    shutil.copytree(REPO / "data/sources/demo", workspace / "data/sources/demo")
    shutil.copytree(tiny_model_dir, workspace / "data/sources/demo-base")
    yaml = YAML()
    params = yaml.load(REPO / "recipes/demo.yaml")
    params["train"].update(max_steps=MAX_STEPS, eval_steps=EVAL_STEPS, logging_steps=1, early_stopping_patience=100)
    params["model"]["max_length"] = 512
    yaml.dump(params, workspace / "params.yaml")
    for stage in ("fetch", "mix", "pack"):
        finish(friction(stage, cwd=workspace))
    return workspace


def copy_of(workspace: Path, name: str) -> Path:
    copy = workspace.with_name(name)
    shutil.copytree(workspace, copy)
    return copy


def adapter_weights(workspace: Path) -> dict[str, torch.Tensor]:
    return load_file(workspace / "models/adapter/adapter_model.safetensors")


@pytest.mark.needs_triton  # trains with TRL
def test_killed_run_resumes_and_matches_an_unbroken_run(packed_workspace: Path):
    unbroken = copy_of(packed_workspace, "unbroken")
    finish(friction("train", cwd=unbroken))

    broken = copy_of(packed_workspace, "broken")
    process = friction("train", cwd=broken)
    checkpoint = broken / f"models/checkpoints/checkpoint-{2 * EVAL_STEPS}/trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (broken / "models/adapter").exists()

    output = finish(friction("train", cwd=broken))
    assert "resuming from models/checkpoints/checkpoint-" in output

    check_saved_adapter(unbroken / "models/adapter")
    expected, resumed = (json.loads((w / "metrics/train.json").read_text()) for w in (unbroken, broken))
    assert (expected["backend"], expected["device"]) == ("hf", device_name())  # train.backend: hf in the demo
    assert "transformers" in expected["versions"] and "unsloth" not in expected["versions"]
    assert expected["steady_tokens_per_s"] > 0 and expected["step_seconds_median"] > 0
    for key in ("final_train_loss", "best_eval_loss", "best_eval_epoch", "steps", "epochs_run"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-6), key
    expected_weights, resumed_weights = adapter_weights(unbroken), adapter_weights(broken)
    assert expected_weights.keys() == resumed_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # The dvclive curves of the resumed run are the unbroken run's: history replayed, nothing logged twice.
    for curve in ("train/loss.tsv", "eval/loss.tsv"):
        unbroken_rows = (unbroken / "dvclive/plots/metrics" / curve).read_text().splitlines()
        resumed_rows = (broken / "dvclive/plots/metrics" / curve).read_text().splitlines()
        assert [row.split("\t")[0] for row in resumed_rows] == [row.split("\t")[0] for row in unbroken_rows]


def check_saved_adapter(adapter: Path) -> None:
    """The tokenizer maps <|im_end|> to the EOS id as the data did, generation stops on it, the config is sorted."""
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.eos_token == IM_END and tokenizer.encode(IM_END, add_special_tokens=False) == [
        tokenizer.eos_token_id
    ]
    assert GenerationConfig.from_pretrained(adapter).eos_token_id == tokenizer.eos_token_id
    modules = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) == 7  # not in PYTHONHASHSEED's order


def test_checkpoints_of_other_inputs_or_half_written_are_not_resumed(tmp_path: Path):
    checkpoints = tmp_path / "checkpoints"
    assert resumable_checkpoint(checkpoints, "run-a") is None
    training.start_afresh(checkpoints, "run-a")
    for step, state in ((4, "{}"), (8, '{"global_step": 8}'), (12, None), (16, '{"global_step": 16, "log_hi')):
        (checkpoints / f"checkpoint-{step}").mkdir()
        if state is not None:
            (checkpoints / f"checkpoint-{step}/trainer_state.json").write_text(state)
    # 12 has no trainer_state.json, 16 a truncated one: both were killed while being saved.
    assert resumable_checkpoint(checkpoints, "run-a") == checkpoints / "checkpoint-8"
    assert resumable_checkpoint(checkpoints, "run-b") is None  # other params or data: not resumed...
    assert (checkpoints / "checkpoint-8").is_dir()  # ...and not deleted until a run of them starts training
    training.start_afresh(checkpoints, "run-b")
    assert list(checkpoints.iterdir()) == [checkpoints / "fingerprint.txt"]


def test_live_log_names_the_curves_by_optimizer_step(tmp_path: Path):
    class State:
        log_history = [{"loss": 2.0, "learning_rate": 1e-3, "step": 1}, {"eval_loss": 1.5, "step": 2}]
        num_input_tokens_seen = 0
        global_step = 3

    log = LiveLog(tmp_path / "live")
    log.on_train_begin(None, State(), None)
    log.on_log(None, State(), None, logs={"loss": 1.0, "train_runtime": 9.0})
    log.on_train_end(None, State(), None)
    metrics = tmp_path / "live/plots/metrics"
    assert (metrics / "train/loss.tsv").read_text().split() == ["step", "loss", "1", "2.0", "3", "1.0"]
    assert (metrics / "eval/loss.tsv").read_text().split() == ["step", "loss", "2", "1.5"]
    assert not (metrics / "train/train_runtime.tsv").exists()


def test_step_timer_times_optimizer_steps_and_leaves_out_the_first(monkeypatch):
    class State:
        num_input_tokens_seen = 0

    clock = iter([0.0, 5.0, 10.0, 12.0, 20.0, 21.0, 30.0, 34.0])  # begin/end of four steps: 5, 2, 1 and 4 s
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    timer, state = StepTimer(), State()
    assert timer.steady_rate() == (None, None)
    for tokens in (100, 400, 300, 800):
        timer.on_step_begin(None, state, None)
        state.num_input_tokens_seen += tokens
        timer.on_step_end(None, state, None)
    assert timer.steps == [(100, 5.0), (400, 2.0), (300, 1.0), (800, 4.0)]
    assert timer.steady_rate() == (2.0, 200.0)  # medians of 2, 1, 4 s and of 200, 300, 200 tokens/s


def test_unsloth_alone_is_told_that_packed_rows_fit_max_length(packed_workspace: Path):
    """unsloth turns padding-free batching off, letting packed examples see each other, unless rows are said to fit."""
    packed = packed_workspace / "data/packed"
    for rows in packed_datasets(packed, "unsloth", 512):
        assert vars(rows)["_unsloth_truncated_to"] == 512  # unsloth reads the claim from the dataset's __dict__
        assert max(map(len, rows["input_ids"])) <= 512  # and the claim is true
    for rows in packed_datasets(packed, "hf", 512):
        assert "_unsloth_truncated_to" not in vars(rows)


def test_training_stops_if_the_trainer_turned_padding_free_batching_off(demo_params, tmp_path: Path):
    args = training.sft_config(demo_params, "unsloth", tmp_path)
    training.require_padding_free(args, "unsloth")  # as the stage configures it
    args.padding_free = False  # what unsloth does to pre-tokenized rows it is not told fit max_length
    with pytest.raises(click.ClickException, match="padding-free batching off.*train.backend: hf"):
        training.require_padding_free(args, "unsloth")
