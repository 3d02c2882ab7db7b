"""Data-parallel training (friction/distributed.py): the step's rows split over processes, and the demo's train stage in
two CPU processes (torchrun, gloo) as it would run on two GPUs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import psutil
import pytest
import torch
from conftest import REPO
from ruamel.yaml import YAML
from safetensors.torch import load_file

from friction import distributed, modeling
from friction.config import load_params
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
    assert command == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(program),
        "train",
        "--live",
        "dvclive",
    ]
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
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's friction
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }


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


@pytest.mark.needs_triton  # trains with TRL
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


@pytest.mark.needs_triton  # trains with TRL
@pytest.mark.e2e
def test_two_processes_killed_midway_resume_and_end_where_an_unbroken_run_does(
    two_process_workspace: Path, tmp_path: Path
):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    for workspace in (unbroken, broken):
        shutil.copytree(two_process_workspace, workspace)
    run(TRAIN, unbroken)

    process = subprocess.Popen(
        TRAIN,
        cwd=broken,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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


@pytest.mark.parametrize(
    ("visible", "alone"),
    [(None, "0"), ("2,3", "2"), ("GPU-8a1c,GPU-77fe", "GPU-8a1c"), ("3", None), ("", None)],
    ids=["unset", "two", "by-uuid", "one-already", "none"],
)
def test_a_single_process_run_keeps_the_first_visible_gpu_alone(visible, alone):
    assert distributed.one_gpu_visible(visible) == alone


def launch_one_process(**environment: str) -> subprocess.CompletedProcess:
    """`launch(1)` in a fresh process, as the train stage calls it first; prints what CUDA_VISIBLE_DEVICES is then."""
    clean = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "WORLD_SIZE")}
    program = (
        "import os; from friction import distributed; distributed.launch(1); "
        "print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    )
    return subprocess.run(
        [sys.executable, "-c", program],
        env=clean | {"PYTHONPATH": str(REPO)} | environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_train_with_one_gpu_restricts_the_visible_devices_before_cuda_starts():
    assert launch_one_process(CUDA_VISIBLE_DEVICES="5,7").stdout.splitlines()[-1] == "5"
    assert launch_one_process().stdout.splitlines()[-1] == "0"
    # A launcher's process is placed by its launcher (LOCAL_RANK): nothing changes.
    launched = launch_one_process(CUDA_VISIBLE_DEVICES="5,7", LOCAL_RANK="0", WORLD_SIZE="1")
    assert launched.stdout.splitlines()[-1] == "5,7"


def test_under_fsdp_a_base_stored_in_4bit_is_refused_before_training(monkeypatch, tmp_path: Path, tiny_model_dir):
    """The card's base (unsloth's bnb-4bit checkpoint) keeps uint8 storage whatever from_pretrained is given."""
    from friction import train_checks

    base = tmp_path / "base-4bit"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {  # as unsloth/DeepSeek-R1-Distill-Qwen-7B-unsloth-bnb-4bit's config.json has it
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_use_double_quant": True,
    }
    (base / "config.json").write_text(json.dumps(config))
    stored = train_checks.base_config(str(base), None).quantization_config
    assert modeling.fsdp_storage_problem(stored).startswith("is stored quantized (4-bit weights packed in uint8)")
    assert modeling.fsdp_storage_problem(None) is None  # a bf16 base: quantized_placement stores it in bf16
    assert modeling.fsdp_storage_problem(stored | {"bnb_4bit_quant_storage": "bfloat16"}) is None

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"base_model": {"location": str(base), "resolved_revision": None}}))
    with pytest.raises(click.ClickException, match="model.base: .*base-4bit is stored quantized.*FSDP"):
        train_checks.check_before_training(load_params(REPO / "recipes/demo.yaml"), packed_dir(tmp_path), manifest)


def packed_dir(tmp_path: Path) -> Path:
    """Packed train and validation files that the checks read (a few rows of random tokens)."""
    import numpy as np
    import pyarrow.parquet as pq

    from bench.train_throughput import packed_rows

    packed = tmp_path / "packed"
    packed.mkdir()
    for split in ("train", "validation"):
        pq.write_table(packed_rows(2, 64, np.random.default_rng(0), vocab=100), packed / f"{split}.parquet")
    return packed
