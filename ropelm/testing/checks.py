"""The conformance checks, one function each; every docstring states its tolerance."""

from __future__ import annotations

from typing import Any

import torch

from ropelm.attention import AttentionSpec
from ropelm.config import ModelConfig
from ropelm.model import TransformerLM
from ropelm.testing.harness import (
    BATCH_TOL,
    BF16_MIN_LENGTH,
    BF16_REL_TOL,
    CACHE_TOL,
    EXACT_TOL,
    NotApplicable,
    assert_changed,
    assert_close,
    assert_finite,
    assert_shape_dtype,
    build_layer,
    build_model,
    cut_points,
    decode_chunk_sizes,
    derive_config,
    max_abs_diff,
    model_logits,
    random_hidden,
    random_tokens,
    require_causal,
    resolve,
    seeded,
    seeded_generator,
)


@torch.no_grad()
def check_output_shape_and_dtype(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """The layer maps (B, T, C) -> (B, T, C) and the model gives logits (B, T, V).

    Both in float32 and in bfloat16 (after ``.to(torch.bfloat16)``): the output
    has the input's dtype, and contains no NaN or inf. The model's loss is a
    finite float32 scalar. Tolerance: none (exact shapes and dtypes).
    """
    config = derive_config(spec, config)
    B, T, C, V = 2, config.block_size, config.n_embd, config.vocab_size
    for dtype in (torch.float32, torch.bfloat16):
        layer = build_layer(spec, config).to(dtype)
        y = layer(random_hidden(config, B, T, seed=1).to(dtype))
        assert_shape_dtype(spec, f"attention layer in {dtype}", y, (B, T, C), dtype)

        model = build_model(spec, config).to(dtype)
        idx = random_tokens(config, B, T, seed=2)
        logits, loss = model(idx, targets=random_tokens(config, B, T, seed=3))
        assert_shape_dtype(spec, f"model logits in {dtype}", logits, (B, T, V), dtype)
        if loss is None or loss.shape != () or loss.dtype != torch.float32:
            raise AssertionError(f"[{spec.name}] model loss in {dtype}: expected a float32 scalar")
        assert_finite(spec, f"model loss in {dtype}", loss)


@torch.no_grad()
def check_causality(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """Changing inputs at positions >= t leaves outputs at positions < t unchanged.

    Checked for a single layer (hidden states changed) and for the whole model
    (token ids changed, every logit at positions < t compared), at t = 1, T/2
    and T-1 with T = block_size. Tolerance: max abs diff <= 1e-6 (float32).
    As a guard against a vacuous pass, outputs at positions >= t must change
    by more than 1e-3. Not applicable to variants that declare causal=False.
    """
    require_causal(spec)
    config = derive_config(spec, config)
    B, T = 2, config.block_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = random_hidden(config, B, T, seed=1)
    idx = random_tokens(config, B, T, seed=2)
    y = layer(x)
    logits = model_logits(model, idx)
    for t in cut_points(T):
        x_changed = x.clone()
        x_changed[:, t:] = random_hidden(config, B, T - t, seed=100 + t)
        y_changed = layer(x_changed)
        where = f"layer, inputs changed at positions >= {t}"
        assert_close(spec, f"{where}, outputs < {t}", y_changed[:, :t], y[:, :t], EXACT_TOL)
        assert_changed(spec, f"{where}, outputs >= {t}", y_changed[:, t:], y[:, t:])

        idx_changed = idx.clone()
        shift = torch.randint(1, config.vocab_size, (B, T - t), generator=seeded_generator(200 + t))
        idx_changed[:, t:] = (idx[:, t:] + shift) % config.vocab_size  # every token differs
        logits_changed = model_logits(model, idx_changed)
        where = f"model, tokens changed at positions >= {t}"
        assert_close(
            spec, f"{where}, logits < {t}", logits_changed[:, :t], logits[:, :t], EXACT_TOL
        )
        assert_changed(spec, f"{where}, logits >= {t}", logits_changed[:, t:], logits[:, t:])


@torch.no_grad()
def check_batch_independence(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """Each sequence of a batch is processed as if it were alone.

    For the layer and for the model, a batch of 3 gives, for every element, the
    output of that element run with batch size 1 (tolerance: max abs diff
    <= 1e-5 in float32, since kernels may block a batch differently), and
    changing element 0 leaves elements 1 and 2 unchanged (max abs diff <= 1e-6).
    """
    config = derive_config(spec, config)
    B, T = 3, config.block_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = random_hidden(config, B, T, seed=1)
    idx = random_tokens(config, B, T, seed=2)
    for name, module, inputs, changed in (
        ("layer", layer, x, random_hidden(config, 1, T, seed=3)),
        ("model", lambda i: model_logits(model, i), idx, random_tokens(config, 1, T, seed=3)),
    ):
        batched = module(inputs)
        for b in range(B):
            alone = module(inputs[b : b + 1])
            assert_close(
                spec,
                f"{name}: batch element {b} vs run alone",
                batched[b : b + 1],
                alone,
                BATCH_TOL,
            )
        inputs_changed = inputs.clone()
        inputs_changed[:1] = changed
        batched_changed = module(inputs_changed)
        assert_close(
            spec,
            f"{name}: elements 1.. after changing element 0",
            batched_changed[1:],
            batched[1:],
            EXACT_TOL,
        )
        assert_changed(
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
    config = derive_config(spec, config, dropout=0.1)
    attention = resolve(spec, config)

    def initial_state(seed: int) -> dict[str, torch.Tensor]:
        with seeded(seed):
            return TransformerLM(config, attention).state_dict()

    first, second, other = initial_state(0), initial_state(0), initial_state(1)
    for key, value in first.items():
        if not torch.equal(value, second[key]):
            raise AssertionError(f"[{spec.name}] initialisation under seed 0 differs at {key}")
    if all(torch.equal(value, other[key]) for key, value in first.items()):
        raise AssertionError(f"[{spec.name}] seeds 0 and 1 gave identical initial parameters")

    model_a, model_b = build_model(spec, config), build_model(spec, config)
    idx = random_tokens(config, 2, config.block_size, seed=2)
    with torch.no_grad():
        for mode in ("eval", "train"):
            model_a.train(mode == "train")
            model_b.train(mode == "train")
            with seeded(7):
                logits_a = model_logits(model_a, idx)
            with seeded(7):
                logits_b = model_logits(model_b, idx)
            if not torch.equal(logits_a, logits_b):
                diff = max_abs_diff(logits_a, logits_b)
                raise AssertionError(
                    f"[{spec.name}] {mode} mode: same seed, different logits "
                    f"(max abs diff {diff:.3g}; expected bitwise equality)"
                )
        model_a.eval()
        if not torch.equal(model_logits(model_a, idx), model_logits(model_a, idx)):
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
    config = derive_config(spec, config, dropout=0.1)
    layer = build_layer(spec, config)
    reference = build_layer(spec, derive_config(spec, config, dropout=0.0))
    reference.load_state_dict(layer.state_dict())
    x = random_hidden(config, 2, config.block_size, seed=1)
    assert_close(spec, "eval mode with dropout 0.1 vs dropout 0", layer(x), reference(x), EXACT_TOL)
    layer.train()
    with seeded(1):
        y1 = layer(x)
    with seeded(2):
        y2 = layer(x)
    assert_changed(spec, "train mode with dropout 0.1, two seeds", y1, y2)


def check_gradients_reach_every_parameter(
    spec: AttentionSpec, config: ModelConfig | None = None
) -> None:
    """Backpropagating the LM loss gives every parameter a finite, non-zero gradient.

    Model: cross-entropy on random targets at T = block_size. Layer: the sum of
    its output times a fixed random tensor; the layer input's gradient must be
    finite and non-zero too. Tolerance: a gradient counts as non-zero when its
    largest absolute entry is > 0.
    """
    config = derive_config(spec, config)
    B, T = 2, config.block_size
    model = build_model(spec, config).train()
    idx, targets = random_tokens(config, B, T, seed=1), random_tokens(config, B, T, seed=2)
    _, loss = model(idx, targets=targets)
    loss.backward()
    _assert_gradients(spec, "model", model.named_parameters())

    layer = build_layer(spec, config).train()
    x = random_hidden(config, B, T, seed=3).requires_grad_(True)
    weights = random_hidden(config, B, T, seed=4)
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
    config = derive_config(spec, config)
    T, C, V = config.block_size, config.n_embd, config.vocab_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = random_hidden(config, 2, 2 * T, seed=1)
    idx = random_tokens(config, 2, 2 * T, seed=2)
    outputs = {}
    for length in (1, T):
        y = layer(x[:, :length])
        assert_shape_dtype(spec, f"layer at T={length}", y, (2, length, C), torch.float32)
        logits = model_logits(model, idx[:, :length])
        assert_shape_dtype(spec, f"model at T={length}", logits, (2, length, V), torch.float32)
        outputs[length] = (y, logits)
    if spec.capabilities.causal:
        (y_1, logits_1), (y_t, logits_t) = outputs[1], outputs[T]
        assert_close(spec, f"layer position 0, T=1 vs T={T}", y_1, y_t[:, :1], BATCH_TOL)
        assert_close(spec, f"model position 0, T=1 vs T={T}", logits_1, logits_t[:, :1], BATCH_TOL)
    if spec.capabilities.extrapolates:
        logits_2t = model_logits(model, idx)
        assert_shape_dtype(
            spec, f"model at T={2 * T} (extrapolates)", logits_2t, (2, 2 * T, V), torch.float32
        )
        if spec.capabilities.causal:
            assert_close(
                spec,
                f"model, first {T} positions at T={2 * T}",
                logits_2t[:, :T],
                logits_t,
                BATCH_TOL,
            )


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
    config = derive_config(spec, config)
    B, T = 2, config.block_size
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = random_hidden(config, B, T, seed=1)
    idx = random_tokens(config, B, T, seed=2)
    full_y = layer(x)
    full_logits = model_logits(model, idx)
    for label, sizes in (("token by token", [1] * T), ("in chunks", decode_chunk_sizes(T))):
        cache = layer.init_cache(B, T, x.device, x.dtype)
        state = model.init_decode_state(B, T)
        ys, logits, start = [], [], 0
        for size in sizes:
            ys.append(layer(x[:, start : start + size], cache=cache))
            logits.append(model_logits(model, idx[:, start : start + size], state=state))
            start += size
        assert_close(spec, f"layer, KV cache {label}", torch.cat(ys, dim=1), full_y, CACHE_TOL)
        assert_close(
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
    config = derive_config(spec, config)
    T = max(config.block_size, BF16_MIN_LENGTH)
    config = derive_config(spec, config, block_size=T)
    layer = build_layer(spec, config)
    model = build_model(spec, config)
    x = random_hidden(config, 1, T, seed=1)
    idx = random_tokens(config, 1, T, seed=2)
    fp32 = {"layer": layer(x), "model": model_logits(model, idx)}
    bf16 = {
        "layer": layer.to(torch.bfloat16)(x.to(torch.bfloat16)),
        "model": model_logits(model.to(torch.bfloat16), idx),
    }
    for name in fp32:
        assert_finite(spec, f"{name} in bf16", bf16[name])
        error = (bf16[name].double() - fp32[name].double()).norm() / fp32[name].double().norm()
        if not error <= BF16_REL_TOL:
            raise AssertionError(
                f"[{spec.name}] {name}: bf16 relative error {error:.3g} > tolerance "
                f"{BF16_REL_TOL:g} at T={T}"
            )
