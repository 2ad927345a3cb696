"""Evaluation: validation loss and perplexity over non-overlapping windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from ropelm.distributed import DistributedContext


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    token_file: Any,
    *,
    batch_size: int,
    block_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    dist_ctx: DistributedContext | None = None,
) -> float:
    """Mean next-token cross-entropy over the evaluation windows of ``token_file``.

    Windows are non-overlapping and cover the split once (up to ``max_batches``
    batches). Under torchrun each process takes every world_size-th batch and the
    sums are reduced, so the result equals the single-process one.
    """
    dist_ctx = dist_ctx or DistributedContext()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    batches = token_file.eval_batches(batch_size, block_size, max_batches)
    for i, (x, y) in enumerate(batches):
        if i % dist_ctx.world_size != dist_ctx.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast():
            _, loss = model(x, y)
        n = y.numel()
        total[0] += loss.double() * n
        total[1] += n
    model.train(was_training)
    total = dist_ctx.all_reduce_sum(total)
    if total[1] == 0:
        return float("nan")
    return (total[0] / total[1]).item()


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay finite in JSON."""
    return math.exp(min(loss, 700.0))
