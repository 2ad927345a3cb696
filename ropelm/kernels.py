"""The three backends that run causal softmax attention, and the choice between them.

A layer's variant reaches the kernels as :class:`ScoreFunctions`: an optional
``score_mod``, an optional ``mask_mod`` (both with FlexAttention's signatures,
see :mod:`ropelm.masks`) and an optional logit soft-cap. Every backend computes
the same function of them:

``sdpa``
    ``scaled_dot_product_attention(is_causal=True)``: only for variants that
    need nothing but causality (RoPE-SM, NoPE, ...); the fused kernel skips the
    masked upper triangle.
``flex``
    compiled ``flex_attention`` with a ``BlockMask`` built once per (length,
    device): one fused, block-sparse kernel per variant, whose cost follows the
    unmasked blocks (a sliding window costs O(T w), not O(T^2)). No attention
    dropout, and torch 2.13 has no CPU backward for it.
``dense``
    the reference (:mod:`ropelm.dense_attention`): score_mod and mask_mod
    evaluated over the index grid with ``torch.vmap`` into an additive bias
    (cached per length while it cannot change), then SDPA over chunks of
    queries, each against only the span of keys its mask leaves open: the
    causal upper triangle and the blocks outside a window are skipped, as the
    block-sparse kernels do.

``auto`` (the default, ``model.attention_backend``) picks per call: ``sdpa``
for plain causal attention; otherwise ``flex`` on CUDA (when no attention
dropout is active and no KV cache is being continued) and ``dense`` everywhere
else. ``dense`` wins on the CPU: measured on the development machine (AMD
EPYC, one thread, quickstart layer B=2, 4 heads, head size 32, T=2048,
forward), chunked dense ALiBi takes 49 ms and sliding window 256 takes 17 ms,
compiled flex 67 ms and 30 ms, and causal SDPA 39 ms (the numbers behind the
choice; ``benchmarks/test_bench_kernels.py`` measures them side by side); CPU
training needs it anyway (no flex backward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ropelm.errors import ConfigError
from ropelm.masks import MaskMod, ScoreMod, and_masks, causal, document_mask, softcapped

BACKENDS = ("auto", "sdpa", "flex", "dense")
# Every variant (score_mod, mask_mod), length, dtype and head layout compiles its own graph
# of the one flex_attention function; dynamo's default of 8 graphs per function would send
# the ninth to the slow eager path (a bench of every variant at two lengths needs ~20).
FLEX_RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class ScoreFunctions:
    """What a variant changes in softmax attention: a score_mod, a mask_mod, a soft-cap."""

    score_mod: ScoreMod | None = None
    mask_mod: MaskMod | None = None
    softcap: float | None = None

    @property
    def causal_only(self) -> bool:
        """Nothing but causality: the ``sdpa`` backend's fused causal kernel can run it."""
        return self.score_mod is None and self.mask_mod is None and self.softcap is None

    def full_score_mod(self) -> ScoreMod | None:
        """The score_mod the kernels apply: the variant's, then the soft-cap."""
        if self.softcap is None:
            return self.score_mod
        return softcapped(self.score_mod, self.softcap)

    def full_mask_mod(self, document_ids: torch.Tensor | None = None) -> MaskMod:
        """Causality, the variant's mask and the document mask, combined."""
        mods = [causal]
        if self.mask_mod is not None:
            mods.append(self.mask_mod)
        if document_ids is not None:
            mods.append(document_mask(document_ids))
        return mods[0] if len(mods) == 1 else and_masks(*mods)


CPU_FLEX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def flex_importable() -> bool:
    """Whether this torch has FlexAttention (2.5 and later)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_problem(
    device: torch.device, needs_grad: bool, dropout_p: float, dtype: torch.dtype = torch.float32
) -> str | None:
    """Why the flex backend cannot run this call, as a sentence naming what can; else None."""
    if not flex_importable():
        return (
            f"model.attention_backend: flex needs FlexAttention (torch >= 2.5), this is torch "
            f"{torch.__version__}; use attention_backend: dense or auto."
        )
    if device.type == "cpu" and dtype not in CPU_FLEX_DTYPES:
        return (
            f"model.attention_backend: flex runs float32, float16 and bfloat16 on the CPU, not "
            f"{dtype}; use attention_backend: dense or auto."
        )
    if device.type == "cpu" and needs_grad:
        return (
            "model.attention_backend: flex has no backward on the CPU in this torch; train on "
            "the CPU with attention_backend: dense or auto (flex still serves CPU inference)."
        )
    if dropout_p > 0:
        return (
            "model.attention_backend: flex applies no attention dropout; set model.dropout: 0 "
            "or use attention_backend: dense or auto."
        )
    return None


def choose_backend(
    requested: str,
    functions: ScoreFunctions,
    *,
    device: torch.device,
    dtype: torch.dtype,
    needs_grad: bool,
    dropout_p: float,
    start: int,
    documents: bool,
) -> str:
    """The backend one attention call runs on (see the module docstring for ``auto``).

    Raises:
        ConfigError: the requested backend cannot run this call (one sentence naming one that can).
    """
    plain = functions.causal_only and not documents
    if requested == "sdpa":
        if not plain:
            raise ConfigError(
                "model.attention_backend: sdpa runs plain causal attention only, and this layer "
                "changes scores or masks; use attention_backend: flex, dense or auto."
            )
        return "sdpa"
    if requested == "flex":
        problem = flex_problem(device, needs_grad, dropout_p, dtype)
        if problem is not None:
            raise ConfigError(problem)
        return "flex"
    if requested == "dense":
        return "dense"
    if plain:
        return "sdpa"
    on_gpu_from_start = device.type == "cuda" and start == 0
    if on_gpu_from_start and flex_problem(device, needs_grad, dropout_p, dtype) is None:
        return "flex"
    return "dense"


# -- sdpa ----------------------------------------------------------------------------------------


def expand_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Keys or values (B, nkv, L, hs) repeated to (B, nh, L, hs) for grouped-query attention."""
    return x if x.size(1) == n_head else x.repeat_interleave(n_head // x.size(1), dim=1)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, dropout_p: float
) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hs) at positions start.. over k, v (B, nkv, start+T, hs)."""
    t_query, gqa = q.size(2), k.size(1) != q.size(1)
    if start == 0:
        mask, is_causal = None, True
    elif t_query == 1:  # one new token sees every cached key
        mask, is_causal = None, False
    else:
        positions = torch.arange(start, start + t_query, device=q.device)[:, None]
        mask, is_causal = positions >= torch.arange(k.size(2), device=q.device)[None, :], False
        if gqa and q.is_cuda:  # CUDA's mask-taking kernels lack GQA: expand rather than fall back
            k, v, gqa = expand_kv(k, q.size(1)), expand_kv(v, q.size(1)), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa
    )


# -- flex ----------------------------------------------------------------------------------------


@functools.cache
def compiled_flex_attention(dynamic: bool) -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, built once per process (static or dynamic shapes)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def _offset_mask(mask_mod: MaskMod, offset: torch.Tensor) -> MaskMod:
    """``mask_mod`` with q_idx moved by ``offset`` (a tensor: changing it never recompiles)."""

    def shifted(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, q_idx + offset, kv_idx)

    return shifted


def _offset_score(score_mod: ScoreMod, offset: torch.Tensor) -> ScoreMod:
    """``score_mod`` with q_idx moved by ``offset`` (FlexAttention reads the arity: no *args)."""

    def shifted(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score_mod(score, b, h, q_idx + offset, kv_idx)

    return shifted


class FlexAttention:
    """The ``flex`` backend of one layer, with its cache of block masks per (length, device)."""

    def __init__(self) -> None:
        self._block_masks: dict[tuple[int, int, torch.device], Any] = {}

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        functions: ScoreFunctions,
        *,
        start: int,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        T, L = q.size(2), k.size(2)
        score_mod = functions.full_score_mod()
        mask_mod = functions.full_mask_mod(document_ids)
        if start:  # continuing a KV cache: queries sit at positions start..start+T-1
            offset = torch.tensor(start, dtype=torch.int32, device=q.device)
            mask_mod = _offset_mask(mask_mod, offset)
            score_mod = score_mod and _offset_score(score_mod, offset)
        key = (T, L, q.device)
        block_mask = self._block_masks.get(key) if not start and document_ids is None else None
        if block_mask is None:
            batch = document_ids.size(0) if document_ids is not None else None
            block_mask = create_block_mask(mask_mod, batch, None, T, L, device=q.device)
            if not start and document_ids is None:
                self._block_masks[key] = block_mask
        flex = compiled_flex_attention(dynamic=bool(start))
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            return flex(
                q, k, v, score_mod=score_mod, block_mask=block_mask,
                enable_gqa=k.size(1) != q.size(1),
            )  # fmt: skip
