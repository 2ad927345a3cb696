"""Data parallelism for training: DDP (replicate) or FSDP2 (shard), and their checkpoints.

``train.parallel`` chooses under torchrun:

``ddp``
    every process holds the whole model and optimizer; gradients are averaged
    (``DistributedDataParallel``). The default, and the fastest while the model,
    its gradients and AdamW's two moments fit on one device.
``fsdp``
    every block's parameters, gradients and optimizer state are sharded over the
    processes (``torch.distributed.fsdp.fully_shard``, FSDP2) and gathered only
    while the block runs: memory per device falls with the number of processes,
    for models beyond one GPU. With bf16 the parameters compute in bf16 and the
    gradients are reduced in fp32 (``MixedPrecisionPolicy``). Checkpoints keep
    the sharded model and optimizer with ``torch.distributed.checkpoint``, so a
    run resumes on any number of processes, and still write the whole model as
    one safetensors file for ``load_model``, ``generate`` and ``eval``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ropelm.distributed import DistributedContext
from ropelm.errors import ConfigError
from ropelm.model import TransformerLM
from ropelm.recipe import Precision

SHARDED_DIR = "sharded"  # inside a checkpoint directory: the FSDP model and optimizer shards


def check_parallel(parallel: str, dist: DistributedContext, precision: Precision) -> None:
    """Raises ConfigError for an FSDP setup that cannot run (one sentence)."""
    if parallel != "fsdp":
        return
    if not dist.launched:
        raise ConfigError(
            "train.parallel: fsdp shards the model over torchrun processes; launch with "
            "`torchrun --nproc_per_node=N -m ropelm.cli run ...` (N may be 1) or use ddp."
        )
    if precision.needs_grad_scaler:
        raise ConfigError(
            "train.parallel: fsdp runs in bf16 or fp32, not fp16; set train.precision: bf16."
        )


def wrap_for_training(
    model: TransformerLM,
    parallel: str,
    dist: DistributedContext,
    device: torch.device,
    precision: Precision,
    compile: bool,
) -> nn.Module:
    """The module training steps run: ``model`` compiled and/or wrapped for data parallelism.

    Under FSDP ``model`` itself is sharded in place (its parameters become
    DTensors) and returned; under DDP the wrapper is returned and ``model`` keeps
    the plain parameters that checkpoints save.
    """
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # the logits come back as a view of the LM head's 2-D output; nothing modifies them
        # in place, which is what FSDP2's warning about returned views is about
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")

        policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return torch.compile(model) if compile else model
    train_model: nn.Module = torch.compile(model) if compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    return train_model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`wrap_for_training` (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (a collective under FSDP: every rank calls it;
    the main process gets the tensors, the others an empty dict)."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and the optimizer under ``directory``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load shards written by :func:`save_sharded`, on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
