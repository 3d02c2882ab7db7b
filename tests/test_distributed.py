"""Data-parallel training (friction/distributed.py): the step's rows split over processes, and the demo's train stage in
two CPU processes (torchrun, gloo) as it would run on two GPUs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import sys
from pathlib import Path

import click
import psutil
import pytest
import torch
from ruamel.yaml import YAML
from safetensors.torch import load_file

from conftest import REPO
from friction import distributed, modeling
from friction.pipeline import stage_argv

TRAIN = stage_argv("train", REPO / "dvc.yaml")  # `python -m stages train` with its paths, as DVC runs it


@pytest.mark.parametrize(
    ("processes", "expected"),
    [(1, (2, 4)), (2, (2, 2)), (4, (2, 1)), (8, (1, 1))],
)
def test_the_card_recipes_step_keeps_its_eight_rows_on_any_number_of_gpus(processes, expected):
    batch, accumulation = distributed.per_device_schedule(batch_size=2, grad_accum=4, processes=processes)
    assert (batch, accumulation) == expected
    assert batch * accumulation * processes == 8  # x 4096 tokens = 32,768 tokens per optimizer step


def test_a_step_that_cannot_be_split_evenly_says_so():
    with pytest.raises(click.ClickException, match="8 rows per optimizer step cannot be split evenly over 3"):
        distributed.per_device_schedule(batch_size=2, grad_accum=4, processes=3)


def test_torchrun_restarts_the_same_program(tmp_path: Path):
    program = tmp_path / "friction"
    program.write_text("")
    command = distributed.torchrun_command(2, [str(program), "train", "--live", "dvclive"])
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(program), "train", "--live", "dvclive"]  # fmt: skip
    as_module = distributed.torchrun_command(2, ["/repo/stages/__main__.py", "train", "--live", "dvclive"], "stages")
    assert as_module[-5:] == ["-m", "stages", "train", "--live", "dvclive"]  # dvc.yaml's `python -m stages train`
    with pytest.raises(click.ClickException, match="start the stage as `python -m stages train`"):
        distributed.torchrun_command(2, ["-c", "train"])  # python -c: nothing to restart


def test_a_launcher_with_another_process_count_than_params_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(click.ClickException, match="train.gpus is 2 in params.yaml, but the launcher started 4"):
        distributed.launch(2)
    distributed.launch(4)  # as many as params.yaml says: this process trains


def test_more_gpus_than_visible_is_refused(monkeypatch):
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(click.ClickException, match="train.gpus is 2, but 1 CUDA GPUs are visible"):
        distributed.launch(2)


STEPS = 6


@pytest.fixture(scope="module")
def two_process_workspace(demo_workspace) -> Path:
    workspace = demo_workspace("ddp")
    yaml = YAML()
    params = yaml.load(workspace / "params.yaml")
    params["train"].update(gpus=2, max_steps=STEPS, eval_steps=3, logging_steps=1, early_stopping_patience=100)
    yaml.dump(params, workspace / "params.yaml")
    return workspace


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{REPO / '.venv/bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}  # fmt: skip


def run(command: list[str], workspace: Path) -> str:
    result = subprocess.run(command, cwd=workspace, env=environment(), capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def check_one_run_was_written(workspace: Path, output: str) -> dict:
    assert output.count("adapter in models/adapter") == 1  # the first process alone writes the outputs
    assert (workspace / "models/adapter/adapter_model.safetensors").is_file()
    assert (workspace / "dvclive/metrics.json").is_file()
    metrics = json.loads((workspace / "metrics/train.json").read_text())
    assert (metrics["processes"], metrics["parallelism"]) == (2, "ddp")
    # The demo's step of 2 rows x 1 micro-batch is 1 row per process per step.
    assert (metrics["per_device_batch_size"], metrics["per_device_grad_accum"], metrics["steps"]) == (1, 1, STEPS)
    assert metrics["attn_implementation"] == "varlen"  # auto, on a CPU: one SDPA call per document
    return metrics


@pytest.mark.e2e
def test_friction_train_with_two_gpus_starts_two_processes_that_hold_the_same_weights(
    two_process_workspace: Path, tmp_path: Path
):
    """`train.gpus: 2` on a CPU: two gloo processes started by torchrun, as on two GPUs."""
    workspace = tmp_path / "run"
    shutil.copytree(two_process_workspace, workspace)
    output = run([sys.executable, str(REPO / "tests/ddp_probe.py")], workspace)
    assert "data parallel over 2 CPU processes" in output
    check_one_run_was_written(workspace, output)
    first, second = (load_file(workspace / f"rank-weights/{rank}.safetensors") for rank in (0, 1))
    assert first.keys() == second.keys() and len(first) == 2 * 2 * 7  # A and B of 7 projections in 2 layers
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    adapter = load_file(workspace / "models/adapter/adapter_model.safetensors")
    trained = next(name for name in first if "lora_B" in name)
    assert torch.count_nonzero(first[trained]) > 0  # lora_B starts at zero: the processes did train
    assert len(adapter) == len(first)


def test_each_process_loads_the_4bit_base_on_its_own_gpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    placement = modeling.quantized_placement()
    assert placement["device_map"] == {"": 3}
    assert placement["quantization_config"].bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default


def test_under_fsdp_the_4bit_weights_are_stored_shardable_and_placed_by_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for an FSDP config
    placement = modeling.quantized_placement()
    config = placement["quantization_config"]
    assert "device_map" not in placement
    assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == torch.bfloat16


def test_fsdp_without_a_gpu_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(click.ClickException, match="FSDP .* shards the model over CUDA GPUs"):
        distributed.launch(2)


def test_the_shipped_fsdp_config_is_an_accelerate_fsdp_config_that_the_stage_recognises(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = REPO / "examples/accelerate-fsdp-qlora.yaml"
    arguments = launch_command_parser().parse_args(["--config_file", str(config), "-m", "stages", "train"])
    environment = prepare_multi_gpu_env(_validate_launch_command(arguments)[0])  # what accelerate launch exports
    assert environment["FSDP_USE_ORIG_PARAMS"] == "false"
    assert environment["FSDP_ACTIVATION_CHECKPOINTING"] == "false"  # train.gradient_checkpointing does it
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert distributed.fsdp_requested()


def test_the_card_names_the_attention_kernel_and_the_data_parallel_processes(tmp_path: Path):
    from test_card import build_card, write_run

    paths = write_run(tmp_path)
    metrics = json.loads((paths["metrics"] / "train.json").read_text())
    metrics |= {"attn_implementation": "varlen", "processes": 4, "parallelism": "ddp"}
    (paths["metrics"] / "train.json").write_text(json.dumps(metrics))
    text = build_card(paths).text
    assert "| hardware | NVIDIA H100 80GB HBM3, 4 data-parallel processes (ddp) |" in text
    assert "| attention | varlen (`model.attn_implementation: auto`) |" in text


@pytest.mark.e2e
def test_two_processes_killed_midway_resume_and_end_where_an_unbroken_run_does(
    two_process_workspace: Path, tmp_path: Path
):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    for workspace in (unbroken, broken):
        shutil.copytree(two_process_workspace, workspace)
    run(TRAIN, unbroken)

    process = subprocess.Popen(TRAIN, cwd=broken, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    checkpoint = broken / "models/checkpoints/checkpoint-3/trainer_state.json"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # As when the machine goes down: torchrun and its workers (each in a session of its own) die at once.
    for pid in [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]:
        os.kill(pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not (broken / "models/adapter").exists()

    output = run(TRAIN, broken)
    assert "resuming from models/checkpoints/checkpoint-3" in output
    expected, resumed = (json.loads((w / "metrics/train.json").read_text()) for w in (unbroken, broken))
    for key in ("final_train_loss", "best_eval_loss", "steps"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-6), key
    expected_weights = load_file(unbroken / "models/adapter/adapter_model.safetensors")
    for name, tensor in load_file(broken / "models/adapter/adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, expected_weights[name], rtol=1e-5, atol=1e-6, msg=name)
