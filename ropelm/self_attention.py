"""Causal multi-head self-attention built from a variant's parts, and its KV cache.

Shapes follow the legend of :mod:`ropelm.attention` (B, T, C, nh, nkv, hs).
A variant is the plain layer plus up to four parts, so a plugin's factory is a
single call::

    SelfAttention(config, n_kv_head=..., softcap=...,     # SoftmaxOptions
                  rotation=RotaryEmbedding(...),          # q, k -> rotated q, k
                  score_mod=alibi_score_mod(n_head),      # FlexAttention signature
                  mask_mod=sliding_window(window))        # FlexAttention signature

``rotation`` and ``score_mod`` may be ``nn.Module`` s with parameters (a learned
bias table): they are registered as submodules, trained and saved. The
attention itself runs on the backend ``model.attention_backend`` asks for
(:mod:`ropelm.kernels`); :attr:`SelfAttention.last_backend` says which ran.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ropelm.config import ModelConfig
from ropelm.dense_attention import DenseAttention, DensePlans
from ropelm.errors import ConfigError
from ropelm.kernels import FlexAttention, ScoreFunctions, choose_backend, sdpa_attention
from ropelm.masks import MaskMod, ScoreMod

# (q, k, start) -> (q, k): queries and keys (B, nh|nkv, T, hs) at positions start..start+T-1
Rotation = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class KVCache:
    """Keys and values of one attention layer, preallocated for ``max_len`` positions.

    ``n_head`` is the number of key/value heads stored: ``n_kv_head`` under
    grouped-query attention.
    """

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, nkv, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far; also the position of the next token

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, nkv, T, hs); return all keys and values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot grow to {end}.")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: fused QKV projection, a variant's parts, projection.

    Without parts it is NoPE: causal softmax attention with no position
    information. ``n_kv_head`` < ``n_head`` gives grouped-query attention: query
    head h reads key/value head ``h // (n_head // n_kv_head)``. The projection
    stays one fused ``c_attn`` whose rows are [q (n_head * hs), k (n_kv_head * hs),
    v (n_kv_head * hs)], so with ``n_kv_head == n_head`` the parameters and the
    checkpoint layout are the plain multi-head ones.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        n_kv_head: int | None = None,
        rotation: Rotation | None = None,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_head if n_kv_head is None else n_kv_head
        if self.n_kv_head < 1 or config.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.att_options.n_kv_head: must divide n_head ({config.n_head}), "
                f"got {self.n_kv_head}; use a divisor such as 1 (MQA) or {config.n_head} (MHA)."
            )
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        kv_dim = self.n_kv_head * self.head_size
        self.qkv_sizes = (config.n_embd, kv_dim, kv_dim)
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotation = rotation  # an nn.Module becomes a submodule (its parameters train)
        self.score_mod = score_mod
        self.functions = ScoreFunctions(score_mod, mask_mod, softcap)
        self.variant = config.att_type
        self.backend = config.attention_backend
        if self.backend == "sdpa" and not self.functions.causal_only:
            raise ConfigError(
                f"model.attention_backend: sdpa runs plain causal attention only, and "
                f"'{self.variant}' changes scores or masks; use flex, dense or auto."
            )
        self._flex = FlexAttention()
        self._dense = DenseAttention(config.n_head)
        self._flex_failed = False
        self.last_backend: str | None = None  # the backend of the latest forward pass

    def share_dense_plans(self, plans: DensePlans) -> None:
        """Keep the dense backend's materialized runs in ``plans``, which the model's other
        layers share (one copy of equal masks and biases)."""
        self._dense.plans = plans

    @property
    def gqa(self) -> bool:
        """True when keys and values have fewer heads than queries."""
        return self.n_kv_head != self.n_head

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, nkv, T, hs) of x (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        return q, k, v

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """Merge heads of y (B, nh, T, hs) and project back to (B, T, C)."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(x)  # (B, nh, T, hs), (B, nkv, T, hs) x 2
        start = cache.length if cache is not None else 0
        q, k = self.position_qk(q, k, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, start + T, hs)
        if document_ids is None:
            y = self.attend(q, k, v, start)  # (B, nh, T, hs)
        else:
            y = self.attend(q, k, v, start, document_ids=document_ids)
        return self.project_out(y)

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Give queries and keys (B, nh|nkv, T, hs) at positions start..start+T-1 their position."""
        return (q, k) if self.rotation is None else self.rotation(q, k, start)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal softmax attention of q (B, nh, T, hs) over k, v (B, nkv, start + T, hs)."""
        dropout_p = self.dropout if self.training else 0.0
        backend = choose_backend(
            self.backend, self.functions, device=q.device, dtype=q.dtype, dropout_p=dropout_p,
            start=start,
            needs_grad=torch.is_grad_enabled() and q.requires_grad,
            documents=document_ids is not None,
        )  # fmt: skip
        if backend == "flex" and not self._flex_failed:
            y = self._try_flex(q, k, v, start, document_ids)
            if y is not None:
                self.last_backend = "flex"
                return y
        if backend == "sdpa":
            self.last_backend = "sdpa"
            return sdpa_attention(q, k, v, start=start, dropout_p=dropout_p)
        self.last_backend = "dense"
        return self._dense(
            q, k, v, self.functions, start=start, dropout_p=dropout_p, document_ids=document_ids
        )

    def _try_flex(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int,
        document_ids: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """FlexAttention, or None (with one warning) when the variant's functions do not compile."""
        try:
            return self._flex(q, k, v, self.functions, start=start, document_ids=document_ids)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a tracing or compiler failure: the dense backend still runs
            self._flex_failed = True
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            warnings.warn(
                f"Attention '{self.variant}' does not run under FlexAttention "
                f"({type(err).__name__}: {reason}); it runs on the dense backend instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        return KVCache(batch_size, self.n_kv_head, max_len, self.head_size, device, dtype)

    def extra_repr(self) -> str:
        parts: dict[str, Any] = {"backend": self.backend}
        if self.functions.softcap is not None:
            parts["softcap"] = self.functions.softcap
        if self.functions.mask_mod is not None:
            parts["mask_mod"] = getattr(self.functions.mask_mod, "__name__", "mask_mod")
        return ", ".join(f"{k}={v}" for k, v in parts.items())
