"""Conformance checks of the attention kernels: backends agree, the dense backend is exact.

They apply to layers built from parts (:class:`ropelm.SelfAttention`); a
plugin's own module (the escape hatch, e.g. RoPE-Linear) is ``NotApplicable``
except for the document-mask check, which every variant that declares
``capabilities.document_mask`` must pass.

The oracle, :func:`naive_attention`, is written without the kernels: the full
(B, nh, T, L) score matrix, the variant's score_mod and mask_mod applied to
every element with ``torch.vmap`` (exactly as FlexAttention defines them),
softmax, weights times values.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ropelm.attention import AttentionSpec
from ropelm.config import ModelConfig
from ropelm.kernels import flex_problem
from ropelm.masks import causal
from ropelm.self_attention import SelfAttention
from ropelm.testing.harness import (
    EXACT_TOL,
    NotApplicable,
    assert_changed,
    assert_close,
    build_layer,
    derive_config,
    random_hidden,
    seeded_generator,
)

BACKEND_TOL = 1e-5  # flex / sdpa vs dense, float32 on the CPU
REFERENCE_TOL = 1e-8  # dense vs the naive oracle, float64: outputs and every gradient
CUDA_BF16_REL_TOL = 0.02  # flex vs dense in bf16 on CUDA, relative Frobenius error


def _built_from_parts(spec: AttentionSpec, layer: Any) -> SelfAttention:
    """The layer, if its attention is SelfAttention's (parts on the kernels), else NotApplicable."""
    own = [
        name
        for name in ("forward", "attend")
        if getattr(type(layer), name, None) is not getattr(SelfAttention, name)
    ]
    if not isinstance(layer, SelfAttention) or own:
        raise NotApplicable(
            f"'{spec.name}' computes attention in its own module "
            f"({', '.join(own) or 'not a SelfAttention'}), not on ropelm's kernels"
        )
    return layer


def _layer_on(spec: AttentionSpec, config: ModelConfig, backend: str) -> SelfAttention:
    layer = build_layer(spec, derive_config(spec, config, attention_backend=backend))
    return _built_from_parts(spec, layer)


def _over_all(fn: Any, with_score: bool) -> Any:
    """``fn`` vmapped over the (b, h, q_idx, kv_idx) grid, its last four arguments; with
    ``with_score`` its first argument is a (B, nh, T, L) tensor, one score per point."""
    for position in (3, 2, 1, 0):  # innermost level: kv_idx, then q_idx, h, b
        in_dims = [None] * 4
        in_dims[position] = 0
        fn = torch.vmap(fn, in_dims=((0,) if with_score else ()) + tuple(in_dims))
    return fn


def naive_attention(
    layer: SelfAttention, x: torch.Tensor, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's output for x (B, T, C), with attention written out (the oracle)."""
    q, k, v = layer.project_qkv(x)
    q, k = layer.position_qk(q, k, 0)
    groups = layer.n_head // layer.n_kv_head
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, nh, T, hs)
    B, nh, T, hs = q.shape
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, T)
    index = [torch.arange(n, dtype=torch.int32) for n in (B, nh, T, T)]
    functions = layer.functions
    score_mod = functions.full_score_mod()
    if score_mod is not None:
        scores = _over_all(score_mod, with_score=True)(scores, *index)
    allowed = _over_all(causal, with_score=False)(*index)  # (B, nh, T, T)
    if functions.mask_mod is not None:
        allowed = allowed & _over_all(functions.mask_mod, with_score=False)(*index)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return layer.project_out(weights @ v)


@torch.no_grad()
def check_backends_agree(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """flex and sdpa give the dense backend's output on the same weights.

    For the layer at T = block_size in float32 on the CPU (inference): flex
    always (unless FlexAttention is missing), sdpa when the variant changes
    nothing but the causal mask. Tolerance: max abs diff <= 1e-5. The dense
    backend itself is checked against the naive oracle by
    :func:`check_dense_matches_reference`.
    """
    config = derive_config(spec, config)
    dense = _layer_on(spec, config, "dense")
    x = random_hidden(config, 2, config.block_size, seed=1)
    expected = dense(x)
    backends = ["sdpa"] if dense.functions.causal_only else []
    if flex_problem(x.device, needs_grad=False, dropout_p=0.0) is None:
        backends.append("flex")
    for backend in backends:
        layer = _layer_on(spec, config, backend)
        got = layer(x)
        if layer.last_backend != backend:
            raise AssertionError(f"[{spec.name}] asked for {backend}, {layer.last_backend} ran")
        assert_close(spec, f"layer on {backend} vs dense", got, expected, BACKEND_TOL)


def check_dense_matches_reference(spec: AttentionSpec, config: ModelConfig | None = None) -> None:
    """The dense backend equals the naive oracle, forward and backward, in float64.

    Output and the gradients of the input and of every parameter (a learned
    bias table included) of the layer at T = block_size, with and without a
    document mask, against :func:`naive_attention` on the same weights.
    Tolerance: max abs diff <= 1e-8.
    """
    config = derive_config(spec, config)
    layer = _layer_on(spec, config, "dense").double().train()
    T = config.block_size
    x = random_hidden(config, 2, T, seed=1).double()
    weights = random_hidden(config, 2, T, seed=2).double()
    ids = torch.tensor([[0] * (T // 3) + [1] * (T - T // 3), [0] * T])  # two documents, one
    for documents in (None, ids):
        results = []
        for attend in (
            layer,
            lambda x_, document_ids=None: naive_attention(layer, x_, document_ids),
        ):
            layer.zero_grad(set_to_none=True)
            x_in = x.clone().requires_grad_(True)
            y = attend(x_in) if documents is None else attend(x_in, document_ids=documents)
            (y * weights).sum().backward()
            grads = {"input": x_in.grad}
            grads.update({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
            results.append((y.detach(), grads))
        (y_dense, g_dense), (y_naive, g_naive) = results
        where = "with a document mask" if documents is not None else "causal"
        assert_close(spec, f"dense vs naive output, {where}", y_dense, y_naive, REFERENCE_TOL)
        if g_dense.keys() != g_naive.keys():
            raise AssertionError(f"[{spec.name}] dense and naive grads reach other parameters")
        for name, grad in g_dense.items():
            assert_close(
                spec, f"dense vs naive gradient of {name}, {where}", grad, g_naive[name],
                REFERENCE_TOL,
            )  # fmt: skip


@torch.no_grad()
def check_document_mask_isolates_documents(
    spec: AttentionSpec, config: ModelConfig | None = None
) -> None:
    """With ``document_ids``, no position attends to another document.

    A batch whose rows hold documents [0, t) and [t, T): changing the first
    document's inputs leaves the outputs of the second unchanged (max abs diff
    <= 1e-6), while without document ids they do change (> 1e-3, the guard).
    Not applicable to variants that do not declare ``document_mask``.
    """
    if not spec.capabilities.document_mask:
        raise NotApplicable(f"'{spec.name}' declares document_mask=False")
    config = derive_config(spec, config)
    T = config.block_size
    t = T // 3
    layer = build_layer(spec, config)
    x = random_hidden(config, 2, T, seed=1)
    x_changed = x.clone()
    x_changed[:, :t] = random_hidden(config, 2, t, seed=2)
    ids = torch.tensor([[0] * t + [1] * (T - t)] * 2)
    second = slice(t, T)
    y, y_changed = layer(x, document_ids=ids), layer(x_changed, document_ids=ids)
    where = "second document after changing the first"
    assert_close(spec, where, y_changed[:, second], y[:, second], EXACT_TOL)
    assert_changed(spec, f"{where}, without document ids", layer(x_changed)[:, second],
                   layer(x)[:, second])  # fmt: skip


def check_flex_matches_dense_on_cuda(
    spec: AttentionSpec, config: ModelConfig | None = None
) -> None:
    """On CUDA, flex forward and backward match dense in bf16.

    The layer in bf16 at T = max(block_size, 256): output and input gradient.
    Tolerance: relative Frobenius error <= 0.02 (bf16 keeps 8 bits; the two
    backends round in different orders). Not applicable without CUDA.
    """
    if not torch.cuda.is_available():
        raise NotApplicable("no CUDA device")
    config = derive_config(spec, config)
    config = derive_config(spec, config, block_size=max(config.block_size, 256))
    device = torch.device("cuda")
    x = random_hidden(config, 2, config.block_size, seed=1).to(device, torch.bfloat16)
    grad = torch.randn(x.shape, generator=seeded_generator(2)).to(device, torch.bfloat16)
    results = {}
    for backend in ("dense", "flex"):
        layer = _layer_on(spec, config, backend).to(device, torch.bfloat16)
        x_in = x.clone().requires_grad_(True)
        y = layer(x_in)
        y.backward(grad)
        results[backend] = (y.detach().float(), x_in.grad.float())
    for i, what in enumerate(("output", "input gradient")):
        ref, got = results["dense"][i], results["flex"][i]
        error = ((got - ref).norm() / ref.norm()).item()
        if not error <= CUDA_BF16_REL_TOL:
            raise AssertionError(
                f"[{spec.name}] CUDA bf16 flex vs dense {what}: relative error {error:.3g} > "
                f"{CUDA_BF16_REL_TOL}"
            )
