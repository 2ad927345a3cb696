"""Conformance checks for attention plugins, importable by plugin authors.

Every registered attention variant must pass these checks; ``tests/conformance``
runs them on each variant of :meth:`ropelm.Registry.default`. A plugin author
runs them on their own spec with::

    from ropelm.testing import run_all
    run_all(my_spec)                       # raises AssertionError listing every failure

or one at a time (``check_causality(my_spec)``, ...; see :data:`CHECKS`).

Each check builds a small :class:`ropelm.TransformerLM` and/or a single
attention layer (``spec.factory``) from :func:`conformance_config`, on the CPU in
float32 unless it says otherwise, raises :class:`AssertionError` with a message
naming the variant and what went wrong, and raises :class:`NotApplicable` when
the variant's declared :class:`ropelm.Capabilities` rule the check out (no KV
cache, not causal). Each docstring states the check's tolerance.

Weights: the default initialisation (std 0.02) makes q . k nearly zero, so
attention is almost uniform and a position bug (a wrong offset in the KV cache,
a rotation in the wrong precision) would change outputs by less than the
tolerances. The checks therefore redraw every weight matrix with
std = 1.5 / sqrt(fan_in) (vectors such as biases and LayerNorm weights keep the
values the modules were built with): for RoPE-SM the largest attention weight
of a row is then ~0.5 on average (uniform attention over 32 positions would
give ~0.06) and logits are of order 1-5. Everything is seeded and runs inside
``torch.random.fork_rng``, so the caller's random state is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ropelm.attention import AttentionSpec
from ropelm.hookspecs import hookimpl
from ropelm.model import ModelConfig, TransformerLM
from ropelm.registry import Registry

__all__ = [
    "CHECKS",
    "CheckResult",
    "NotApplicable",
    "build_layer",
    "build_model",
    "check_batch_independence",
    "check_bf16_close_to_fp32",
    "check_causality",
    "check_determinism",
    "check_dropout_only_in_train_mode",
    "check_gradients_reach_every_parameter",
    "check_kv_cache_matches_full_forward",
    "check_output_shape_and_dtype",
    "check_sequence_lengths",
    "conformance_config",
    "run_all",
]

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


def _derive(spec: AttentionSpec, config: ModelConfig | None, **changes: Any) -> ModelConfig:
    """``config`` (default: :func:`conformance_config`) with ``changes`` applied, validated.

    Dropout is 0 unless ``changes`` says otherwise: only the checks about dropout want it.
    """
    values = config.model_dump() if config is not None else {}
    values = {**values, "dropout": 0.0, **changes}
    return conformance_config(spec, **values)


class _SpecPlugin:
    """A plugin object registering one spec, so any spec can build a TransformerLM."""

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @hookimpl
    def ropelm_register_attention(self, register: Callable[[AttentionSpec], None]) -> None:
        register(self.spec)


def _registry_for(spec: AttentionSpec) -> Registry:
    """A registry holding ``spec`` alone (it need not be installed anywhere)."""
    registry = Registry()
    registry.register_plugin(_SpecPlugin(spec), source=f"ropelm.testing ({spec.name})")
    return registry


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the global CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def _redraw_weights(module: nn.Module, seed: int) -> None:
    """Redraw every weight matrix with std WEIGHT_GAIN / sqrt(fan_in) (see module doc)."""
    generator = _gen(seed)
    for param in module.parameters():
        if param.dim() >= 2 and param.is_floating_point():
            fan_in = param[0].numel()
            param.normal_(0.0, WEIGHT_GAIN / math.sqrt(fan_in), generator=generator)


def build_model(spec: AttentionSpec, config: ModelConfig, seed: int = 0) -> TransformerLM:
    """A :class:`TransformerLM` for ``spec`` with redrawn weights, in eval mode."""
    with _seeded(seed):
        model = TransformerLM(config, _registry_for(spec))
    _redraw_weights(model, seed)
    return model.eval()


def build_layer(spec: AttentionSpec, config: ModelConfig, seed: int = 0) -> nn.Module:
    """One attention layer built by ``spec.factory`` with redrawn weights, in eval mode."""
    options = spec.parse_options(config.att_options)
    with _seeded(seed):
        layer = spec.factory(config, options)
    _redraw_weights(layer, seed)
    return layer.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hidden(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Layer input (B, T, C) of unit variance, like a LayerNorm output."""
    return torch.randn(batch, length, config.n_embd, generator=_gen(seed))


def _tokens(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random token ids (B, T)."""
    return torch.randint(config.vocab_size, (batch, length), generator=_gen(seed))


def _logits(model: TransformerLM, idx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    logits, _ = model(idx, **kwargs)
    return logits


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close(
    spec: AttentionSpec, what: str, actual: torch.Tensor, expected: torch.Tensor, tol: float
) -> None:
    """AssertionError unless shapes match and max |actual - expected| <= tol."""
    if actual.shape != expected.shape:
        raise AssertionError(
            f"[{spec.name}] {what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
    diff = _max_abs_diff(actual, expected)
    if not diff <= tol:  # also catches NaN
        raise AssertionError(f"[{spec.name}] {what}: max abs diff {diff:.3g} > tolerance {tol:g}")


def _assert_changed(
    spec: AttentionSpec, what: str, a: torch.Tensor, b: torch.Tensor, at_least: float = 1e-3
) -> None:
    """Guard against vacuous checks: outputs that should differ must differ."""
    diff = _max_abs_diff(a, b)
    if not diff > at_least:
        raise AssertionError(
            f"[{spec.name}] {what}: outputs changed by only {diff:.3g} (expected > {at_least:g})"
        )


def _assert_finite(spec: AttentionSpec, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise AssertionError(f"[{spec.name}] {what}: output contains NaN or inf")


def _assert_shape_dtype(
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
    _assert_finite(spec, what, tensor)


def _cut_points(length: int) -> list[int]:
    """Positions t at which a sequence is split into a kept past and a changed future."""
    return sorted({1, length // 2, length - 1})


def _require_causal(spec: AttentionSpec) -> None:
    if not spec.capabilities.causal:
        raise NotApplicable(f"'{spec.name}' declares causal=False")


# -- the checks ------------------------------------------------------------------------------


@torch.no_grad()
def check_output_shape_and_dtype(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """The layer maps (B, T, C) -> (B, T, C) and the model gives logits (B, T, V).

    Both in float32 and in bfloat16 (after ``.to(torch.bfloat16)``): the output
    has the input's dtype, and contains no NaN or inf. The model's loss is a
    finite float32 scalar. Tolerance: none (exact shapes and dtypes).
    """
    config = _derive(spec, config)
    B, T, C, V = 2, config.block_size, config.n_embd, config.vocab_size
    for dtype in (torch.float32, torch.bfloat16):
        layer = build_layer(spec, config).to(dtype)
        y = layer(_hidden(config, B, T, seed=1).to(dtype))
        _assert_shape_dtype(spec, f"attention layer in {dtype}", y, (B, T, C), dtype)

        model = build_model(spec, config).to(dtype)
        idx = _tokens(config, B, T, seed=2)
        logits, loss = model(idx, targets=_tokens(config, B, T, seed=3))
        _assert_shape_dtype(spec, f"model logits in {dtype}", logits, (B, T, V), dtype)
        if loss is None or loss.shape != () or loss.dtype != torch.float32:
            raise AssertionError(f"[{spec.name}] model loss in {dtype}: expected a float32 scalar")
        _assert_finite(spec, f"model loss in {dtype}", loss)


@torch.no_grad()
def check_causality(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """Changing inputs at positions >= t leaves outputs at positions < t unchanged.

    Checked for a single layer (hidden states changed) and for the whole model
    (token ids changed, every logit at positions < t compared), at t = 1, T/2
    and T-1 with T = block_size. Tolerance: max abs diff <= 1e-6 (float32).
    As a guard against a vacuous pass, outputs at positions >= t must change
    by more than 1e-3. Not applicable to variants that declare causal=False.
    """
    _require_causal(spec)
    config = _derive(spec, config)
    B, T = 2, config.block_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = _hidden(config, B, T, seed=1)
    idx = _tokens(config, B, T, seed=2)
    y = layer(x)
    logits = _logits(model, idx)
    for t in _cut_points(T):
        x_changed = x.clone()
        x_changed[:, t:] = _hidden(config, B, T - t, seed=100 + t)
        y_changed = layer(x_changed)
        where = f"layer, inputs changed at positions >= {t}"
        _assert_close(spec, f"{where}, outputs < {t}", y_changed[:, :t], y[:, :t], EXACT_TOL)
        _assert_changed(spec, f"{where}, outputs >= {t}", y_changed[:, t:], y[:, t:])

        idx_changed = idx.clone()
        shift = torch.randint(1, config.vocab_size, (B, T - t), generator=_gen(200 + t))
        idx_changed[:, t:] = (idx[:, t:] + shift) % config.vocab_size  # every token differs
        logits_changed = _logits(model, idx_changed)
        where = f"model, tokens changed at positions >= {t}"
        _assert_close(
            spec, f"{where}, logits < {t}", logits_changed[:, :t], logits[:, :t], EXACT_TOL
        )
        _assert_changed(spec, f"{where}, logits >= {t}", logits_changed[:, t:], logits[:, t:])


@torch.no_grad()
def check_batch_independence(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """Each sequence of a batch is processed as if it were alone.

    For the layer and for the model, a batch of 3 gives, for every element, the
    output of that element run with batch size 1 (tolerance: max abs diff
    <= 1e-5 in float32, since kernels may block a batch differently), and
    changing element 0 leaves elements 1 and 2 unchanged (max abs diff <= 1e-6).
    """
    config = _derive(spec, config)
    B, T = 3, config.block_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = _hidden(config, B, T, seed=1)
    idx = _tokens(config, B, T, seed=2)
    for name, module, inputs, changed in (
        ("layer", layer, x, _hidden(config, 1, T, seed=3)),
        ("model", lambda i: _logits(model, i), idx, _tokens(config, 1, T, seed=3)),
    ):
        batched = module(inputs)
        for b in range(B):
            alone = module(inputs[b : b + 1])
            _assert_close(
                spec,
                f"{name}: batch element {b} vs run alone",
                batched[b : b + 1],
                alone,
                BATCH_TOL,
            )
        inputs_changed = inputs.clone()
        inputs_changed[:1] = changed
        batched_changed = module(inputs_changed)
        _assert_close(
            spec,
            f"{name}: elements 1.. after changing element 0",
            batched_changed[1:],
            batched[1:],
            EXACT_TOL,
        )
        _assert_changed(
            spec, f"{name}: element 0 after changing it", batched_changed[:1], batched[:1]
        )


def check_determinism(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """The same seed gives the same model and the same outputs, bit for bit.

    Two models built under seed 0 have identical parameters (the module's own
    initialisation, before the checks redraw weights, is compared too) and give
    identical logits, in eval mode and in train mode with dropout 0.1 under the
    same torch seed; two forward passes of one model in eval mode are identical.
    A different seed must give different initial parameters. Tolerance: 0
    (``torch.equal``).
    """
    config = _derive(spec, config, dropout=0.1)
    registry = _registry_for(spec)

    def initial_state(seed: int) -> dict[str, torch.Tensor]:
        with _seeded(seed):
            return TransformerLM(config, registry).state_dict()

    first, second, other = initial_state(0), initial_state(0), initial_state(1)
    for key, value in first.items():
        if not torch.equal(value, second[key]):
            raise AssertionError(f"[{spec.name}] initialisation under seed 0 differs at {key}")
    if all(torch.equal(value, other[key]) for key, value in first.items()):
        raise AssertionError(f"[{spec.name}] seeds 0 and 1 gave identical initial parameters")

    model_a, model_b = build_model(spec, config), build_model(spec, config)
    idx = _tokens(config, 2, config.block_size, seed=2)
    with torch.no_grad():
        for mode in ("eval", "train"):
            model_a.train(mode == "train")
            model_b.train(mode == "train")
            with _seeded(7):
                logits_a = _logits(model_a, idx)
            with _seeded(7):
                logits_b = _logits(model_b, idx)
            if not torch.equal(logits_a, logits_b):
                diff = _max_abs_diff(logits_a, logits_b)
                raise AssertionError(
                    f"[{spec.name}] {mode} mode: same seed, different logits "
                    f"(max abs diff {diff:.3g}; expected bitwise equality)"
                )
        model_a.eval()
        if not torch.equal(_logits(model_a, idx), _logits(model_a, idx)):
            raise AssertionError(f"[{spec.name}] two eval-mode forward passes differ")


@torch.no_grad()
def check_dropout_only_in_train_mode(
    spec: AttentionSpec, config: ModelConfig | None = None
) -> None:
    """The layer applies ``config.dropout`` in train mode and never in eval mode.

    With dropout 0.1: in eval mode the layer's output equals that of the same
    weights built with dropout 0 (max abs diff <= 1e-6); in train mode two
    forward passes under different seeds differ (by more than 1e-3), so the
    variant is regularised like every other one.
    """
    config = _derive(spec, config, dropout=0.1)
    layer = build_layer(spec, config)
    reference = build_layer(spec, _derive(spec, config, dropout=0.0))
    reference.load_state_dict(layer.state_dict())
    x = _hidden(config, 2, config.block_size, seed=1)
    _assert_close(
        spec, "eval mode with dropout 0.1 vs dropout 0", layer(x), reference(x), EXACT_TOL
    )
    layer.train()
    with _seeded(1):
        y1 = layer(x)
    with _seeded(2):
        y2 = layer(x)
    _assert_changed(spec, "train mode with dropout 0.1, two seeds", y1, y2)


def check_gradients_reach_every_parameter(
    spec: AttentionSpec, config: ModelConfig | None = None
) -> None:
    """Backpropagating the LM loss gives every parameter a finite, non-zero gradient.

    Model: cross-entropy on random targets at T = block_size. Layer: the sum of
    its output times a fixed random tensor; the layer input's gradient must be
    finite and non-zero too. Tolerance: a gradient counts as non-zero when its
    largest absolute entry is > 0.
    """
    config = _derive(spec, config)
    B, T = 2, config.block_size
    model = build_model(spec, config).train()
    idx, targets = _tokens(config, B, T, seed=1), _tokens(config, B, T, seed=2)
    _, loss = model(idx, targets=targets)
    loss.backward()
    _assert_gradients(spec, "model", model.named_parameters())

    layer = build_layer(spec, config).train()
    x = _hidden(config, B, T, seed=3).requires_grad_(True)
    weights = _hidden(config, B, T, seed=4)
    (layer(x) * weights).sum().backward()
    _assert_gradients(spec, "layer", [*layer.named_parameters(), ("input", x)])


def _assert_gradients(spec: AttentionSpec, where: str, named: Any) -> None:
    for name, param in named:
        if not param.requires_grad:
            continue
        grad = param.grad
        if grad is None:
            raise AssertionError(f"[{spec.name}] {where}: parameter {name} received no gradient")
        if not torch.isfinite(grad).all():
            raise AssertionError(f"[{spec.name}] {where}: gradient of {name} has NaN or inf")
        if not grad.abs().max() > 0:
            raise AssertionError(f"[{spec.name}] {where}: gradient of {name} is all zeros")


@torch.no_grad()
def check_sequence_lengths(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """T = 1 and T = block_size work for the layer and the model.

    Outputs have the right shape and are finite at both lengths. For causal
    variants the output at position 0 does not depend on T (max abs diff
    <= 1e-5). Variants that declare ``extrapolates`` must also run the model at
    T = 2 * block_size with finite logits, the first block_size of which match
    the T = block_size logits within 1e-5.
    """
    config = _derive(spec, config)
    T, C, V = config.block_size, config.n_embd, config.vocab_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = _hidden(config, 2, 2 * T, seed=1)
    idx = _tokens(config, 2, 2 * T, seed=2)
    outputs = {}
    for length in (1, T):
        y = layer(x[:, :length])
        _assert_shape_dtype(spec, f"layer at T={length}", y, (2, length, C), torch.float32)
        logits = _logits(model, idx[:, :length])
        _assert_shape_dtype(spec, f"model at T={length}", logits, (2, length, V), torch.float32)
        outputs[length] = (y, logits)
    if spec.capabilities.causal:
        (y_1, logits_1), (y_t, logits_t) = outputs[1], outputs[T]
        _assert_close(spec, f"layer position 0, T=1 vs T={T}", y_1, y_t[:, :1], BATCH_TOL)
        _assert_close(spec, f"model position 0, T=1 vs T={T}", logits_1, logits_t[:, :1], BATCH_TOL)
    if spec.capabilities.extrapolates:
        logits_2t = _logits(model, idx)
        _assert_shape_dtype(
            spec, f"model at T={2 * T} (extrapolates)", logits_2t, (2, 2 * T, V), torch.float32
        )
        if spec.capabilities.causal:
            _assert_close(
                spec,
                f"model, first {T} positions at T={2 * T}",
                logits_2t[:, :T],
                logits_t,
                BATCH_TOL,
            )


def _chunk_sizes(length: int) -> list[int]:
    """Irregular chunk sizes summing to ``length``: a prefill, single tokens, odd chunks."""
    pattern = [max(1, length // 4), 1, 1, 3, 2, 5]
    sizes, total, i = [], 0, 0
    while total < length:
        size = min(pattern[i % len(pattern)], length - total)
        sizes.append(size)
        total += size
        i += 1
    return sizes


@torch.no_grad()
def check_kv_cache_matches_full_forward(
    spec: AttentionSpec, config: ModelConfig | None = None
) -> None:
    """Incremental decoding with the KV cache reproduces the full forward pass.

    For the layer (``init_cache`` + ``forward(x, cache=cache)``) and for the model
    (``init_decode_state`` + ``forward(idx, state=state)``), over T = block_size
    positions fed token by token and in irregular chunks (a prefill of T/4,
    single tokens, chunks of 2, 3 and 5), the outputs match the full forward
    pass: max abs diff <= 1e-5 in float32. ``state.position`` ends at T. Not
    applicable to variants that declare ``kv_cache=False``.
    """
    if not spec.capabilities.kv_cache:
        raise NotApplicable(f"'{spec.name}' declares kv_cache=False")
    config = _derive(spec, config)
    B, T = 2, config.block_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = _hidden(config, B, T, seed=1)
    idx = _tokens(config, B, T, seed=2)
    full_y = layer(x)
    full_logits = _logits(model, idx)
    for label, sizes in (("token by token", [1] * T), ("in chunks", _chunk_sizes(T))):
        cache = layer.init_cache(B, T, x.device, x.dtype)
        state = model.init_decode_state(B, T)
        ys, logits, start = [], [], 0
        for size in sizes:
            ys.append(layer(x[:, start : start + size], cache=cache))
            logits.append(_logits(model, idx[:, start : start + size], state=state))
            start += size
        _assert_close(spec, f"layer, KV cache {label}", torch.cat(ys, dim=1), full_y, CACHE_TOL)
        _assert_close(
            spec, f"model, KV cache {label}", torch.cat(logits, dim=1), full_logits, CACHE_TOL
        )
        if state.position != T:
            raise AssertionError(
                f"[{spec.name}] model, KV cache {label}: state.position is {state.position}, "
                f"expected {T}"
            )


@torch.no_grad()
def check_bf16_close_to_fp32(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """A bfloat16 copy of the layer and of the model stays close to float32.

    The module is cast with ``.to(torch.bfloat16)`` and run on bf16 inputs at
    T = max(block_size, 512), so positions past 256 (where bf16 can no longer
    represent every integer) are exercised. Tolerance: relative error
    ||out_bf16 - out_fp32|| / ||out_fp32|| <= 0.05 (Frobenius norms).

    Why 0.05: bf16 keeps 8 significant bits, so every rounding (weights,
    inputs, each matmul output, softmax, LayerNorm) adds a relative error of up
    to 2^-9 ~ 0.2%; the ~15 roundings in series of a 2-layer model add up
    to ~1-2% (measured 0.9-1.6% for RoPE-SM over several seeds). A variant
    that computes its position terms in bf16 (angles, biases, decay factors)
    gets errors of order 1 at large positions, far above the bound.
    """
    config = _derive(spec, config)
    T = max(config.block_size, BF16_MIN_LENGTH)
    config = _derive(spec, config, block_size=T)
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = _hidden(config, 1, T, seed=1)
    idx = _tokens(config, 1, T, seed=2)
    fp32 = {"layer": layer(x), "model": _logits(model, idx)}
    bf16 = {
        "layer": layer.to(torch.bfloat16)(x.to(torch.bfloat16)),
        "model": _logits(model.to(torch.bfloat16), idx),
    }
    for name in fp32:
        _assert_finite(spec, f"{name} in bf16", bf16[name])
        error = (bf16[name].double() - fp32[name].double()).norm() / fp32[name].double().norm()
        if not error <= BF16_REL_TOL:
            raise AssertionError(
                f"[{spec.name}] {name}: bf16 relative error {error:.3g} > tolerance "
                f"{BF16_REL_TOL:g} at T={T}"
            )


#: Every conformance check, in the order :func:`run_all` runs them.
CHECKS: tuple[Check, ...] = (
    check_output_shape_and_dtype,
    check_causality,
    check_batch_independence,
    check_determinism,
    check_dropout_only_in_train_mode,
    check_gradients_reach_every_parameter,
    check_sequence_lengths,
    check_kv_cache_matches_full_forward,
    check_bf16_close_to_fp32,
)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``"passed"``, ``"not applicable"`` or ``"failed"``."""

    check: str
    outcome: str
    message: str = ""


def run_all(spec: AttentionSpec, config: ModelConfig | None = None) -> list[CheckResult]:
    """Run every check in :data:`CHECKS` on ``spec``; raise if any failed.

    Returns one :class:`CheckResult` per check when none failed. Otherwise raises
    a single AssertionError listing every failed check with its message (checks
    that do not apply are not failures).
    """
    results = []
    for check in CHECKS:
        try:
            check(spec, config)
        except NotApplicable as err:
            results.append(CheckResult(check.__name__, "not applicable", str(err)))
        except AssertionError as err:
            results.append(CheckResult(check.__name__, "failed", str(err)))
        except Exception as err:  # a crash is a failure too, reported with its type
            results.append(CheckResult(check.__name__, "failed", f"{type(err).__name__}: {err}"))
        else:
            results.append(CheckResult(check.__name__, "passed"))
    failed = [r for r in results if r.outcome == "failed"]
    if failed:
        lines = "\n".join(f"- {r.check}: {r.message}" for r in failed)
        raise AssertionError(
            f"{len(failed)} of {len(CHECKS)} conformance checks failed for '{spec.name}':\n{lines}"
        )
    return results
