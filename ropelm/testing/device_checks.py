"""Conformance on an accelerator in bf16: what the float32 CPU checks cannot show.

The other checks run on the CPU in float32 (float64 for the kernel oracle).
Training on a GPU runs the same variant under bf16 autocast on other kernels:
flash or memory-efficient SDPA, compiled FlexAttention, the dense backend's bias
in bf16. These checks build the model from the same seeded weights twice -- in
float32 on the CPU (the reference) and on the device under bf16 autocast -- and
compare what training and generation use:

* :func:`check_device_bf16_matches_cpu_fp32`: logits, loss and every parameter's
  gradient of a training forward/backward;
* :func:`check_device_kv_cache_matches_full_forward`: decoding through the KV
  cache on the device against the device's own full forward pass.

With ``device=None`` (how :data:`ropelm.testing.CHECKS` calls them) they run on
CUDA and are NotApplicable without it; ``ropelm-exp device-check`` passes its
device, so ``--device cpu --smoke`` (and the tests) run the same code under CPU
bf16 autocast.
"""

from __future__ import annotations

import torch

from ropelm.attention import AttentionSpec
from ropelm.config import ModelConfig
from ropelm.testing.harness import (
    BF16_MIN_LENGTH,
    BF16_REL_TOL,
    NotApplicable,
    assert_finite,
    build_model,
    decode_chunk_sizes,
    derive_config,
    model_logits,
    random_tokens,
)

#: ||grad_bf16 - grad_fp32|| / ||grad_fp32|| over all parameters together. The backward
#: pass doubles the roundings of the forward one (each matmul's two gradient products in
#: bf16): twice the forward bound.
GRAD_REL_TOL = 2 * BF16_REL_TOL


def _device_or_skip(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        raise NotApplicable("no CUDA device")
    return torch.device("cuda")


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """||got - reference|| / ||reference|| (Frobenius), in float64."""
    reference = reference.detach().double().cpu()
    return ((got.detach().double().cpu() - reference).norm() / reference.norm()).item()


def _assert_relative(spec: AttentionSpec, what: str, error: float, tolerance: float) -> None:
    if not error <= tolerance:
        raise AssertionError(
            f"[{spec.name}] {what}: relative error {error:.3g} > tolerance {tolerance:g}"
        )


def check_device_bf16_matches_cpu_fp32(
    spec: AttentionSpec,
    config: ModelConfig | None = None,
    device: torch.device | str | None = None,
) -> None:
    """A training step's logits, loss and gradients on the device in bf16 match fp32 on the CPU.

    The model (default attention backend: what training on the device picks) at
    T = max(block_size, 512), batch 2, train mode without dropout, forward under
    bf16 autocast and backward. Tolerances (relative Frobenius errors): logits
    and loss <= 0.05 (the bound of ``check_bf16_close_to_fp32``, whose docstring
    derives it); all gradients together <= 0.1 (twice as many bf16 roundings).
    """
    device = _device_or_skip(device)
    config = derive_config(spec, config)
    config = derive_config(spec, config, block_size=max(config.block_size, BF16_MIN_LENGTH))
    idx = random_tokens(config, 2, config.block_size, seed=2)
    results = {}
    for where, dtype in (("cpu", None), (device, torch.bfloat16)):
        model = build_model(spec, config).to(where).train()
        tokens = idx.to(where)
        with torch.autocast(torch.device(where).type, dtype=dtype, enabled=dtype is not None):
            logits, loss = model(tokens, tokens.roll(-1, dims=1))
        loss.backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        results[dtype] = (logits.float(), loss.float(), torch.cat(grads).float())
    logits, loss, grads = results[torch.bfloat16]
    assert_finite(spec, "logits in bf16 on the device", logits)
    reference = results[None]
    for what, got, ref, tol in (("logits", logits, reference[0], BF16_REL_TOL),
                                ("loss", loss, reference[1], BF16_REL_TOL),
                                ("gradients", grads, reference[2], GRAD_REL_TOL)):  # fmt: skip
        _assert_relative(spec, f"{what} in bf16 on {device.type}", relative_error(got, ref), tol)


@torch.no_grad()
def check_device_kv_cache_matches_full_forward(
    spec: AttentionSpec,
    config: ModelConfig | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Decoding through the KV cache on the device in bf16 matches its full forward pass.

    The model under bf16 autocast at T = max(block_size, 512), fed in irregular
    chunks (a prefill of T/4, single tokens, chunks of 2, 3 and 5): the decoding
    kernels (offsets into flex's masks, SDPA on a growing cache) against the
    full forward's. Tolerance: relative Frobenius error of the logits <= 0.05.
    Not applicable to variants that declare ``kv_cache=False``.
    """
    if not spec.capabilities.kv_cache:
        raise NotApplicable(f"'{spec.name}' declares kv_cache=False")
    device = _device_or_skip(device)
    config = derive_config(spec, config)
    T = max(config.block_size, BF16_MIN_LENGTH)
    config = derive_config(spec, config, block_size=T)
    model = build_model(spec, config).to(device).eval()
    idx = random_tokens(config, 2, T, seed=2).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        full = model_logits(model, idx).float()
        state = model.init_decode_state(2, T)
        chunks, start = [], 0
        for size in decode_chunk_sizes(T):
            chunks.append(model_logits(model, idx[:, start : start + size], state=state).float())
            start += size
    decoded = torch.cat(chunks, dim=1)
    assert_finite(spec, "decoded logits in bf16 on the device", decoded)
    error = relative_error(decoded, full)
    _assert_relative(spec, f"KV-cache decoding in bf16 on {device.type}", error, BF16_REL_TOL)


#: The checks that need an accelerator (NotApplicable without CUDA unless given a device).
DEVICE_CHECKS = (check_device_bf16_matches_cpu_fp32, check_device_kv_cache_matches_full_forward)
