"""Several processes (torchrun / accelerate launch): who writes the run folder, barriers, and flags every rank sees.

loralab never runs its own launcher or sync: torchrun (or ``accelerate launch``) starts the processes and sets
``RANK`` / ``WORLD_SIZE``; accelerate's ``PartialState`` sets up the process group (gloo on CPU, NCCL on GPUs), and
the Trainer does the rest (DDP, FSDP, DeepSpeed). This module only answers: which process is the one that writes
(global rank 0), wait for the others, and "did any rank see this?" so that every rank stops at the same step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Sequence

import torch

from loralab.errors import LoralabError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """The one process that creates, writes, overwrites and resumes the run folder (global rank 0)."""
    return rank() == 0


def init_process_group() -> None:
    """Set up the process group the way the Trainer will (accelerate's PartialState), so barriers work before it."""
    if is_distributed() and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def _group_ready() -> bool:
    return is_distributed() and torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait until every process got here (a no-op in a single process)."""
    if _group_ready():
        torch.distributed.barrier()


def any_rank(flag: bool | torch.Tensor, device: torch.device | None = None) -> bool:
    """True when the flag is true on any process (one tiny all-reduce; the flag itself in a single process)."""
    if not _group_ready():
        return bool(flag)
    value = torch.as_tensor(flag, dtype=torch.int32).reshape(1)
    backend = torch.distributed.get_backend()
    value = value.to(device if device is not None and backend != "gloo" else "cpu")
    if backend == "nccl" and value.device.type == "cpu":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def available_devices() -> int:
    """Processes one machine can run: its GPUs, else its CPU cores."""
    return torch.cuda.device_count() or (os.cpu_count() or 1)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m loralab ARGV`` under torchrun with ``nproc`` processes on this machine; returns its exit code."""
    if nproc < 1:
        raise LoralabError(f"--nproc must be at least 1, got {nproc}")
    devices = available_devices()
    if nproc > devices:
        what = f"{torch.cuda.device_count()} GPUs" if torch.cuda.is_available() else f"{devices} CPU cores"
        raise LoralabError(f"--nproc {nproc} is more processes than this machine has ({what}); use at most {devices}")
    if is_distributed():
        raise LoralabError("--nproc starts torchrun itself; inside torchrun / accelerate launch leave it out")
    if shutil.which("torchrun") is None and not _has_module("torch.distributed.run"):
        raise LoralabError("--nproc needs torchrun (part of torch)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "loralab", *argv]
    return subprocess.call(command)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
