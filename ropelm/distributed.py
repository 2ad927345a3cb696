"""Process-group setup for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=N`` sets RANK, LOCAL_RANK and WORLD_SIZE; this module
reads them, binds each process to its own GPU (``cuda:LOCAL_RANK``) before the
process group exists, picks the backend (nccl on CUDA, gloo on the CPU) and
tells the engine which slice of every global batch is its own.
:func:`distributed_session` joins the group and leaves it again when the
command ends, whatever way it ends. Without torchrun's variables everything
runs as a single process (rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ropelm.errors import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # by torchrun (a process group exists, possibly of one process)

    @property
    def enabled(self) -> bool:
        """Whether there are other processes to reduce and synchronise with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over all processes (identity when single-process)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj``, in rank order, on the main process (None elsewhere)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def context_from_env() -> DistributedContext:
    """Read the torchrun environment variables (absent -> single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedContext(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
        launched="WORLD_SIZE" in os.environ,
    )


def resolve_device(name: str, ctx: DistributedContext | None = None) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU.

    Under torchrun every process takes ``cuda:LOCAL_RANK``: an explicit index
    would put every rank on one GPU, so it is refused.

    Raises:
        ConfigError: an unknown device name, CUDA asked for on a machine without
            it, or a GPU index under torchrun.
    """
    ctx = ctx or context_from_env()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"Device '{name}' is not a device name; use auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device '{name}' asks for CUDA, but this machine has no CUDA device (or this torch "
            "has no CUDA support); use cpu or auto."
        )
    if device.type == "cuda" and ctx.enabled and device.index is not None:
        raise ConfigError(
            f"train.device: {name} would put every torchrun process on GPU {device.index}; use "
            "cuda or auto, which give each process its own GPU (cuda:LOCAL_RANK)."
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
    return device


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when launched by torchrun (once); otherwise a no-op.

    On CUDA the process is bound to its device first, and the group is told that
    device, so NCCL never opens a context on another rank's GPU.
    """
    ctx = context_from_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ctx.launched and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return ctx


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[DistributedContext]:
    """:func:`init_distributed` for the length of a command; the group is destroyed at the end.

    After a command that ends normally every rank first waits for the others, so
    that none tears its connections down while another still talks to it (an
    error or a stop skips the wait: the other ranks may never arrive).
    """
    ctx = init_distributed(device)
    try:
        yield ctx
        if ctx.launched and dist.is_initialized():
            dist.barrier()
    finally:
        if ctx.launched and dist.is_initialized():
            dist.destroy_process_group()


THREADS_ENV = "ROPELM_THREADS"


def set_cpu_threads(threads: int) -> None:
    """Use ``threads`` CPU threads here, and let this command's training keep it (``--threads``
    wins over ``train.threads``; children such as torchrun workers inherit it)."""
    os.environ[THREADS_ENV] = str(threads)
    torch.set_num_threads(threads)


def apply_cpu_threads(configured: int | None) -> None:
    """At the start of training: ``--threads`` if given, else ``train.threads`` if set."""
    threads = os.environ.get(THREADS_ENV) or configured
    if threads:
        torch.set_num_threads(int(threads))
