"""The harness behind the conformance checks: small configs, seeded builders, assertions.

See :mod:`ropelm.testing` for why weights are redrawn and how tolerances are chosen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ropelm.attention import AttentionSpec, ResolvedAttention
from ropelm.config import ModelConfig
from ropelm.model import TransformerLM

#: Tolerances (max abs diff unless stated), shared by the checks and quoted in their docs.
EXACT_TOL = 1e-6  # outputs that must not depend on a change at all (float32 noise only)
BATCH_TOL = 1e-5  # same computation at another batch size (kernels may block differently)
CACHE_TOL = 1e-5  # incremental decoding vs the full forward pass, float32
BF16_REL_TOL = 0.05  # ||bf16 - fp32|| / ||fp32|| (Frobenius), see check_bf16_close_to_fp32
WEIGHT_GAIN = 1.5  # weight matrices are redrawn with std = WEIGHT_GAIN / sqrt(fan_in)
BF16_MIN_LENGTH = 512  # bf16 holds integers exactly only up to 256


class NotApplicable(Exception):
    """The check does not apply to the variant, given its declared capabilities.

    ``tests/conformance`` turns it into a pytest skip; :func:`run_all` reports it.
    """


Check = Callable[[AttentionSpec, ModelConfig | None], None]


# -- building blocks -------------------------------------------------------------------------


def conformance_config(spec: AttentionSpec, **overrides: Any) -> ModelConfig:
    """The small model the checks use for ``spec``, with ``overrides`` applied.

    Defaults: block_size 32, vocab_size 64, n_layer 2, n_head 4, n_embd 32 (head
    size 8), dropout 0, bias True, att_type ``spec.name``. Every check also takes
    a ``config`` of its own (e.g. with ``att_options`` for the variant); checks
    that need a particular length or dropout change just that.
    """
    values: dict[str, Any] = {
        "block_size": 32,
        "vocab_size": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 32,
        "dropout": 0.0,
        "bias": True,
    }
    values.update(overrides)
    values["att_type"] = spec.name
    return ModelConfig(**values)


def derive_config(spec: AttentionSpec, config: ModelConfig | None, **changes: Any) -> ModelConfig:
    """``config`` (default: :func:`conformance_config`) with ``changes`` applied, validated.

    Dropout is 0 unless ``changes`` says otherwise: only the checks about dropout want it.
    """
    values = config.model_dump() if config is not None else {}
    values = {**values, "dropout": 0.0, **changes}
    return conformance_config(spec, **values)


def resolve(spec: AttentionSpec, config: ModelConfig) -> ResolvedAttention:
    """``spec`` with ``config.att_options`` parsed, as the registry resolves a variant
    (``config.att_type`` is taken to be ``spec.name``)."""
    config = config.model_copy(update={"att_type": spec.name})
    return ResolvedAttention.resolve(spec, config, source=f"ropelm.testing ({spec.name})")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with the global CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def redraw_weights(module: nn.Module, seed: int) -> None:
    """Redraw every weight matrix with std WEIGHT_GAIN / sqrt(fan_in) (see module doc)."""
    generator = seeded_generator(seed)
    for param in module.parameters():
        if param.dim() >= 2 and param.is_floating_point():
            fan_in = param[0].numel()
            param.normal_(0.0, WEIGHT_GAIN / math.sqrt(fan_in), generator=generator)


def build_model(spec: AttentionSpec, config: ModelConfig, seed: int = 0) -> TransformerLM:
    """A :class:`TransformerLM` for ``spec`` with redrawn weights, in eval mode."""
    with seeded(seed):
        model = TransformerLM(config, resolve(spec, config))
    redraw_weights(model, seed)
    return model.eval()


def build_layer(spec: AttentionSpec, config: ModelConfig, seed: int = 0) -> nn.Module:
    """One attention layer built by ``spec.factory`` with redrawn weights, in eval mode."""
    with seeded(seed):
        layer = resolve(spec, config).build_layer(config)
    redraw_weights(layer, seed)
    return layer.eval()


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_hidden(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Layer input (B, T, C) of unit variance, like a LayerNorm output."""
    return torch.randn(batch, length, config.n_embd, generator=seeded_generator(seed))


def random_tokens(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random token ids (B, T)."""
    return torch.randint(config.vocab_size, (batch, length), generator=seeded_generator(seed))


def model_logits(model: TransformerLM, idx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    logits, _ = model(idx, **kwargs)
    return logits


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(
    spec: AttentionSpec, what: str, actual: torch.Tensor, expected: torch.Tensor, tol: float
) -> None:
    """AssertionError unless shapes match and max |actual - expected| <= tol."""
    if actual.shape != expected.shape:
        raise AssertionError(
            f"[{spec.name}] {what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
    diff = max_abs_diff(actual, expected)
    if not diff <= tol:  # also catches NaN
        raise AssertionError(f"[{spec.name}] {what}: max abs diff {diff:.3g} > tolerance {tol:g}")


def assert_changed(
    spec: AttentionSpec, what: str, a: torch.Tensor, b: torch.Tensor, at_least: float = 1e-3
) -> None:
    """Guard against vacuous checks: outputs that should differ must differ."""
    diff = max_abs_diff(a, b)
    if not diff > at_least:
        raise AssertionError(
            f"[{spec.name}] {what}: outputs changed by only {diff:.3g} (expected > {at_least:g})"
        )


def assert_finite(spec: AttentionSpec, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise AssertionError(f"[{spec.name}] {what}: output contains NaN or inf")


def assert_shape_dtype(
    spec: AttentionSpec,
    what: str,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    if tuple(tensor.shape) != shape:
        raise AssertionError(
            f"[{spec.name}] {what}: output shape {tuple(tensor.shape)}, expected {shape}"
        )
    if tensor.dtype != dtype:
        raise AssertionError(f"[{spec.name}] {what}: output dtype {tensor.dtype}, expected {dtype}")
    assert_finite(spec, what, tensor)


def cut_points(length: int) -> list[int]:
    """Positions t at which a sequence is split into a kept past and a changed future."""
    return sorted({1, length // 2, length - 1})


def require_causal(spec: AttentionSpec) -> None:
    if not spec.capabilities.causal:
        raise NotApplicable(f"'{spec.name}' declares causal=False")


# -- the checks ------------------------------------------------------------------------------


def decode_chunk_sizes(length: int) -> list[int]:
    """Irregular chunk sizes summing to ``length``: a prefill, single tokens, odd chunks."""
    pattern = [max(1, length // 4), 1, 1, 3, 2, 5]
    sizes, total, i = [], 0, 0
    while total < length:
        size = min(pattern[i % len(pattern)], length - total)
        sizes.append(size)
        total += size
        i += 1
    return sizes
