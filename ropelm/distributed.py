"""Process-group setup for data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=N`` sets RANK, LOCAL_RANK and WORLD_SIZE; this module
reads them, picks the backend (nccl on CUDA, gloo on the CPU) and tells the
engine which slice of every global batch is its own. Without those variables
everything runs as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
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
    )


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when launched by torchrun; otherwise a no-op."""
    ctx = context_from_env()
    if ctx.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return ctx


def resolve_device(name: str, ctx: DistributedContext | None = None) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU."""
    ctx = ctx or context_from_env()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
    return device
