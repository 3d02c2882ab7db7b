"""Data-parallel training: `train.gpus` processes started by torch's own launcher, and what each of them must do.

The train stage with `train.gpus: N > 1` replaces itself by `python -m torch.distributed.run --standalone
--nproc_per_node N -m stages train ...` (torchrun), which starts N copies of the stage; the Hugging Face Trainer sees
torchrun's environment and trains with DistributedDataParallel. The stage also runs under a launcher started by
hand (`torchrun`, or `accelerate launch` with an FSDP config such as examples/accelerate-fsdp-qlora.yaml), as long
as the launcher's process count is `train.gpus`, so params.yaml says how the run was made.

The optimizer step keeps the recipe's rows: train.batch_size x train.grad_accum rows per step on one GPU become
the same number of rows split over the N processes (`per_device_schedule`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

T = TypeVar("T")


def world_size() -> int:
    """How many processes train together: torchrun's (and accelerate's) WORLD_SIZE, 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine, which is also the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config exports this; the 4-bit base must then be loaded for sharding."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def one_gpu_visible(visible: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES that leaves a single-process run one GPU, given the one it was started with (None:
    unset, every GPU visible); None when it needs no change (one device, or none, visible already).

    One process with several GPUs visible is not one GPU to transformers: its Trainer counts every visible GPU
    (`n_gpu`) and wraps the model in nn.DataParallel, which TRL's SFTTrainer refuses; a 4-bit base on `{"": 0}` does
    not count as split across devices. The first visible device, alone, is the one the process would have used as
    cuda:0.
    """
    if visible is None:
        return "0"
    devices = [device.strip() for device in visible.split(",") if device.strip()]
    return devices[0] if len(devices) > 1 else None


def restrict_to_one_gpu() -> str | None:
    """Make a single-process run see one GPU (`one_gpu_visible`), before anything in this process initialises CUDA,
    which reads CUDA_VISIBLE_DEVICES once. Returns the value it was before when it changed it, else None."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    alone = one_gpu_visible(before)
    if alone is None:
        return None
    if torch.cuda.is_initialized():  # too late: the device list is fixed for this process
        raise click.ClickException("internal: CUDA was initialised before the train stage chose its GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = alone
    return before if before is not None else "unset"


def torchrun_command(processes: int, argv: list[str], module: str | None = None) -> list[str]:
    """The command that runs this program (`argv`, as sys.argv holds it) in `processes` processes on this machine;
    `module` is the package it was started from with `python -m` (`stages`), whose path argv[0] then holds."""
    if module is not None:
        program = ["-m", module, *argv[1:]]
    elif Path(argv[0]).is_file():
        program = argv
    else:
        raise click.ClickException(
            f"cannot restart {argv[0]!r} under torchrun for train.gpus > 1: start the stage as `python -m stages train`"
        )
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *program]


def started_module() -> str | None:
    """The package this program was started from with `python -m`, None for a script."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return None if spec is None else spec.name.removesuffix(".__main__")


def launch(gpus: int) -> None:
    """Restart this program in `gpus` processes with torchrun, unless this process is one of them already (or `gpus`
    is 1). Replaces this process (its exit status becomes torchrun's); returns only in a process that is to train."""
    launched = world_size()
    if "LOCAL_RANK" not in os.environ and gpus == 1:
        before = restrict_to_one_gpu()  # first: any CUDA call below would fix the list of visible devices
        if before is not None and torch.cuda.is_available():
            click.echo(
                f"train: train.gpus is 1: one process on one GPU, CUDA_VISIBLE_DEVICES="
                f"{os.environ['CUDA_VISIBLE_DEVICES']} ({torch.cuda.get_device_name(0)}; "
                f"CUDA_VISIBLE_DEVICES was {before})"
            )
    if fsdp_requested() and not torch.cuda.is_available():
        raise click.ClickException(
            "FSDP (accelerate launch with an FSDP config) shards the model over CUDA GPUs, "
            "and none is visible; on a CPU, train.gpus > 1 runs DDP over gloo"
        )
    if "LOCAL_RANK" in os.environ:  # started by a launcher
        if launched != gpus:
            raise click.ClickException(
                f"train.gpus is {gpus} in params.yaml, but the launcher started {launched} processes; "
                f"set train.gpus: {launched} so that params.yaml says how the run was made"
            )
        return
    if gpus == 1:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        raise click.ClickException(
            f"train.gpus is {gpus}, but {torch.cuda.device_count()} CUDA GPUs are visible "
            "(CUDA_VISIBLE_DEVICES); lower train.gpus in params.yaml"
        )
    command = torchrun_command(gpus, sys.argv, started_module())
    where = "GPUs" if torch.cuda.is_available() else "CPU processes (gloo: no CUDA GPU, a test of the path only)"
    click.echo(f"train: data parallel over {gpus} {where}, started by torchrun")
    sys.stdout.flush()
    os.execv(command[0], command)


def per_device_schedule(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for `processes` that together make the optimizer step of
    `batch_size` x `grad_accum` rows on one device: accumulation is cut first, then the batch, never the step."""
    rows = batch_size * grad_accum
    if rows % processes:
        raise click.ClickException(
            f"train.batch_size x train.grad_accum = {rows} rows per optimizer step cannot be split evenly over "
            f"{processes} processes (train.gpus); choose values whose product is a multiple of {processes}"
        )
    per_process = rows // processes
    batch = max(size for size in range(1, batch_size + 1) if per_process % size == 0)
    return batch, per_process // batch


def on_main_process(function: Callable[[], T]) -> T:
    """Run `function` on the main process alone and hand its result to every process (e.g. preparing a directory
    that all of them then read). With one process, just runs it."""
    if world_size() == 1:
        return function()
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())  # joins torchrun's process group; the Trainer reuses it
    result = [function() if state.is_main_process else None]
    return broadcast_object_list(result, from_process=0)[0]


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the trained model's whole state gathered on the first process (every process must call this);
    None otherwise, where each process holds the whole model and the first one saves it as it is."""
    if not trainer.is_fsdp_enabled:
        return None
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    return trainer.accelerator.get_state_dict(trainer.model)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def describe() -> dict[str, Any]:
    """How the run was spread, for metrics/train.json."""
    parallelism = "fsdp" if fsdp_requested() else "ddp" if world_size() > 1 else "none"
    described: dict[str, Any] = {"processes": world_size(), "parallelism": parallelism}
    if torch.cuda.is_available():  # which GPUs the run saw (one alone for train.gpus: 1)
        described["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return described
