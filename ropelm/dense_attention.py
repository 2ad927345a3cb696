"""The ``dense`` attention backend: a variant's functions materialized, SDPA on the open spans.

The reference backend of :mod:`ropelm.kernels`, and the one that trains on the
CPU. For a length T (queries at positions start..start+T-1) and L keys, the
variant's ``mask_mod`` and ``score_mod`` are evaluated with ``torch.vmap`` over
the index grid of every chunk of queries (:data:`QUERY_CHUNK`, or
:data:`QUERY_CHUNK_TRAINING` when a gradient is needed), and only the span
of keys the chunk may see is kept: causal attention then costs about half the
T x L grid, a sliding window T x (chunk + window). The bias and mask of each
span go to SDPA as its additive ``attn_mask``; with a soft-cap (no bias) the
chunk's softmax is written out instead.

Consecutive chunks whose spans have the same size and offset and the same
mask (every chunk of a sliding window after the first few) run as one SDPA call
over stacked windows, as block-sparse kernels would run them: a run of ``m``
chunks of ``c`` queries reads its keys with ``unfold`` into (B m, nkv, span, hs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ropelm.kernels import ScoreFunctions, expand_kv

# Queries per chunk, measured on the CPU (quickstart shape, T = 1024 and 2048, one thread):
# inference is fastest with 64 (ALiBi 0.93x RoPE-SM with 64, 0.90x with 128), training,
# whose backward pays for every extra call and window copy, with 128 (0.97x against 0.92x).
QUERY_CHUNK = 64
QUERY_CHUNK_TRAINING = 128


def _over_grid(fn: Callable[..., torch.Tensor], n_leading: int) -> Callable[..., torch.Tensor]:
    """``fn`` vmapped over (h, q_idx, kv_idx), its last three arguments: (H, T, L) out."""
    none = (None,) * n_leading
    over_kv = torch.vmap(fn, in_dims=(*none, None, None, 0))
    over_q = torch.vmap(over_kv, in_dims=(*none, None, 0, None))
    return torch.vmap(over_q, in_dims=(*none, 0, None, None))


@dataclass(frozen=True)
class DenseRun:
    """``count`` chunks of ``size`` queries from ``q_start``; chunk i sees keys
    ``kv_start + i * size`` .. ``+ span``, all with the same mask and bias.

    ``allowed`` (1, nh, size, span) bool is causality and the variant's mask;
    ``attn_mask`` the mask and the variant's score_mod as SDPA takes them (the
    bias with -inf where not allowed, in the queries' dtype, or ``allowed`` itself
    without a score_mod or with a soft-cap); ``bias`` (1, nh, size, span) float32
    is the score_mod alone, kept only for a soft-cap, which applies it before
    capping (else None).
    """

    q_start: int
    size: int
    count: int
    kv_start: int
    span: int
    allowed: torch.Tensor
    bias: torch.Tensor | None
    attn_mask: torch.Tensor

    @property
    def q_end(self) -> int:
        return self.q_start + self.size * self.count

    @property
    def kv_end(self) -> int:
        return self.kv_start + self.size * (self.count - 1) + self.span

    def extends(self, other: DenseRun) -> bool:
        """Whether ``other`` (one chunk) continues this run with the same mask and bias."""
        same_shape = other.size == self.size and other.span == self.span
        if not (same_shape and other.q_start == self.q_end):
            return False
        if other.kv_start != self.kv_start + self.size * self.count:
            return False
        return self.same_tensors(other)

    @property
    def has_bias(self) -> bool:
        """Whether a score_mod adds to the scores (the mask is then a float bias)."""
        return self.attn_mask.dtype != torch.bool

    def same_tensors(self, other: DenseRun) -> bool:
        """Whether ``other`` holds the same mask and bias (its shape may differ)."""
        if (self.bias is None) != (other.bias is None) or self.has_bias != other.has_bias:
            return False
        if self.bias is not None and not torch.equal(self.bias, other.bias):
            return False
        return torch.equal(self.allowed, other.allowed) and torch.equal(
            self.attn_mask, other.attn_mask
        )

    def windows(self, x: torch.Tensor, keys: bool) -> torch.Tensor:
        """The run's queries or keys of x (B, H, T, hs), stacked: (B count, H, size|span, hs)."""
        if self.count == 1:  # a plain slice: no copy
            return (
                x[:, :, self.kv_start : self.kv_end] if keys else x[:, :, self.q_start : self.q_end]
            )
        if not keys:
            rows = x[:, :, self.q_start : self.q_end]  # (B, H, count size, hs)
            return rows.unflatten(2, (self.count, self.size)).transpose(1, 2).flatten(0, 1)
        rows = x[:, :, self.kv_start : self.kv_end].unfold(2, self.span, self.size)
        return rows.permute(0, 2, 1, 4, 3).flatten(0, 1)  # (B count, H, span, hs)

    def same_document(self, document_ids: torch.Tensor) -> torch.Tensor:
        """(B count, 1, size, span): keys in the query's own document, from ids (B, T)."""
        if self.count == 1:
            q_ids = document_ids[:, self.q_start : self.q_end, None]  # (B, size, 1)
            return (q_ids == document_ids[:, None, self.kv_start : self.kv_end])[:, None]
        q_ids = document_ids[:, self.q_start : self.q_end].unflatten(1, (self.count, self.size))
        kv_ids = document_ids[:, self.kv_start : self.kv_end].unfold(1, self.span, self.size)
        return (q_ids[..., None] == kv_ids[:, :, None, :]).flatten(0, 1)[:, None]


def dense_runs(
    functions: ScoreFunctions,
    n_head: int,
    start: int,
    t_query: int,
    t_key: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    chunk: int = QUERY_CHUNK,
) -> list[DenseRun]:
    """The variant's functions evaluated (batch 0) over every chunk of queries at positions
    start..start+T-1 and the span of keys it may see, consecutive equal chunks merged."""
    b = torch.zeros((), dtype=torch.int32, device=device)
    heads = torch.arange(n_head, dtype=torch.int32, device=device)
    keys = torch.arange(t_key, dtype=torch.int32, device=device)
    mask_grid = _over_grid(functions.full_mask_mod(), 1)
    score_grid = _over_grid(functions.score_mod, 2) if functions.score_mod is not None else None
    zero = torch.zeros((), dtype=torch.float32, device=device)
    runs: list[DenseRun] = []
    for q_start in range(0, t_query, chunk):
        q_end = min(t_query, q_start + chunk)
        queries = torch.arange(start + q_start, start + q_end, dtype=torch.int32, device=device)
        allowed = mask_grid(b, heads, queries, keys)  # (nh, Tc, L)
        seen = allowed.any(0).any(0).nonzero()  # key indices any query of the chunk may see
        lo, hi = int(seen[0]), int(seen[-1]) + 1  # every query sees at least itself
        allowed = allowed[None, :, :, lo:hi].contiguous()  # (1, nh, Tc, Lc)
        bias = score_grid(zero, b, heads, queries, keys[lo:hi])[None] if score_grid else None
        attn_mask = allowed
        if bias is not None and functions.softcap is None:  # one copy: the bias in the mask
            attn_mask, bias = bias.to(dtype).masked_fill(~allowed, float("-inf")), None
        run = DenseRun(q_start, q_end - q_start, 1, lo, hi - lo, allowed, bias, attn_mask)
        if runs and runs[-1].extends(run):
            runs[-1] = DenseRun(**{**runs[-1].__dict__, "count": runs[-1].count + 1})
        else:
            runs.append(run)
    return runs


class DensePlans:
    """The materialized runs of every layer of one model, each distinct plan held once.

    ALiBi, a sliding window or any variant whose functions do not depend on the
    layer gives every layer the same tensors: 12 copies at nh 12 and T 1024 would
    be 0.4 GiB, one is 33 MiB. A layer's new plan is checked against the plans the
    other layers hold now for the same call (equal tensors, not equal functions: a
    plugin may well make each layer different) and shares theirs when equal. Each
    layer keeps only its latest plan, so memory is bounded by the distinct plans
    in use.
    """

    def __init__(self) -> None:
        self._latest: dict[object, tuple[tuple[Any, ...], list[DenseRun]]] = {}

    def get(self, owner: object, key: tuple[Any, ...]) -> list[DenseRun] | None:
        """The plan ``owner`` made last, if it was made for ``key``."""
        latest = self._latest.get(owner)
        return latest[1] if latest is not None and latest[0] == key else None

    def keep(self, owner: object, key: tuple[Any, ...], runs: list[DenseRun]) -> list[DenseRun]:
        """Remember ``runs`` as ``owner``'s plan for ``key``; an equal plan another owner
        holds for the same call (``key`` but its parameter versions) is returned instead."""
        self._latest.pop(owner, None)  # the old plan can be freed before the comparison
        call = key[:-1]
        for other_key, other_runs in self._latest.values():
            if other_key[:-1] == call and _same_plan(other_runs, runs):
                runs = other_runs
                break
        self._latest[owner] = (key, runs)
        return runs

    def forget(self, owner: object) -> None:
        """Drop ``owner``'s plan (it needed a gradient: nothing to reuse)."""
        self._latest.pop(owner, None)

    def __len__(self) -> int:
        """Distinct plans held."""
        return len({id(runs) for _, runs in self._latest.values()})


def _same_plan(a: list[DenseRun], b: list[DenseRun]) -> bool:
    return len(a) == len(b) and all(
        (x.q_start, x.size, x.count, x.kv_start, x.span)
        == (y.q_start, y.size, y.count, y.kv_start, y.span)
        and x.same_tensors(y)
        for x, y in zip(a, b, strict=True)
    )


class DenseAttention:
    """The ``dense`` backend of one layer.

    The runs are cached for the latest (length, offset, device, dtype, chunk) as long
    as they cannot change: no parameter of the score_mod needs a gradient (a learned
    bias is recomputed in every training forward, with its autograd graph), and
    the parameters are at the versions the bias was made from. The cache is a
    :class:`DensePlans` the model's layers share (``SelfAttention.share_dense_plans``), or the
    layer's own.
    """

    def __init__(self, n_head: int, plans: DensePlans | None = None) -> None:
        self.n_head = n_head
        self.plans = DensePlans() if plans is None else plans
        self._owner = object()  # its key in the shared plans (an id could be reused)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        functions: ScoreFunctions,
        *,
        start: int,
        dropout_p: float,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, nh, T, _ = q.shape
        training = torch.is_grad_enabled() and q.requires_grad
        chunk = QUERY_CHUNK_TRAINING if training else QUERY_CHUNK
        gqa = k.size(1) != nh
        if gqa and (q.is_cuda or functions.softcap is not None):  # no GQA kernel takes a mask
            k, v, gqa = expand_kv(k, nh), expand_kv(v, nh), False
        outputs = []
        for run in self.runs(functions, start, T, k.size(2), q.device, q.dtype, chunk):
            q_r = run.windows(q, keys=False)  # (B m, nh, size, hs)
            k_r, v_r = run.windows(k, keys=True), run.windows(v, keys=True)  # (B m, nkv, span, hs)
            allowed, mask = run.allowed, run.attn_mask
            if document_ids is not None:  # (B m, 1, size, span)
                same = run.same_document(document_ids)
                allowed = allowed & same
                mask = mask.masked_fill(~same, -math.inf) if run.has_bias else allowed
            if functions.softcap is not None:
                y = _capped_attention(
                    q_r, k_r, v_r, run.bias, allowed, functions.softcap, dropout_p
                )
            else:
                y = F.scaled_dot_product_attention(
                    q_r, k_r, v_r, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
                )  # (B m, nh, size, hs)
            if run.count > 1:  # (B m, nh, size, hs) -> (B, nh, m size, hs)
                y = y.unflatten(0, (B, run.count)).transpose(1, 2).flatten(2, 3)
            outputs.append(y)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)  # (B, nh, T, hs)

    @torch.compiler.disable  # a data-dependent plan (key spans): built eagerly, then cached
    def runs(
        self,
        functions: ScoreFunctions,
        start: int,
        T: int,
        L: int,
        device: torch.device,
        dtype: torch.dtype,
        chunk: int = QUERY_CHUNK,
    ) -> list[DenseRun]:
        """The materialized runs for this call, from the cache when they cannot have changed."""
        params = list(_parameters(functions.score_mod))
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        key = (T, L, start, device, dtype, chunk, tuple((id(p), p._version) for p in params))
        owner = self._owner
        if not cacheable:
            self.plans.forget(owner)
            return dense_runs(functions, self.n_head, start, T, L, device, dtype, chunk)
        cached = self.plans.get(owner, key)
        if cached is not None:
            return cached
        runs = dense_runs(functions, self.n_head, start, T, L, device, dtype, chunk)
        return self.plans.keep(owner, key, runs)


def _parameters(score_mod: Any) -> Iterator[torch.nn.Parameter]:
    return score_mod.parameters() if isinstance(score_mod, torch.nn.Module) else iter(())


def _capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    allowed: torch.Tensor,
    cap: float,
    dropout_p: float,
) -> torch.Tensor:
    """Softmax attention with soft-capped scores, written out (a cap is no bias), computed in
    float32 at least."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q_c, k_c, v_c = q.to(compute), k.to(compute), v.to(compute)
    scores = (q_c @ k_c.transpose(-1, -2)) / math.sqrt(q.size(-1))  # (B, nh, T, L)
    if bias is not None:
        scores = scores + bias
    scores = (cap * torch.tanh(scores / cap)).masked_fill(~allowed, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return (weights @ v_c).to(v.dtype)
