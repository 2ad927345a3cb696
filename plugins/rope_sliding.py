"""RoPE-Sliding: sliding-window (local) causal softmax attention with RoPE.

Local attention as in the Sparse Transformer's "strided/local" patterns (Child et
al., 2019, https://arxiv.org/abs/1904.10509), Longformer (Beltagy et al., 2020,
https://arxiv.org/abs/2004.05150) and Mistral 7B (Jiang et al., 2023,
https://arxiv.org/abs/2310.06825), with RoPE (https://arxiv.org/abs/2104.09864).

Query i sees keys j with 0 <= i - j < ``window``: the last ``window`` positions,
itself included. Three paths give the same result:

* T <= window: plain causal SDPA (the window cuts nothing);
* T <= 2 * chunk: SDPA with a dense (T, T) band mask;
* longer T (training): queries are split into chunks of c positions; chunk i
  attends to the c + window keys at positions [i c - window, (i + 1) c) through
  one batched SDPA call with a (c, c + window) band mask, so time and memory grow
  as T (c + window) instead of T^2 and the T x T score matrix never exists. Keys
  are gathered with ``unfold``; the first ceil(window / c) chunks, whose windows
  would reach before position 0, are one small dense band-masked block.

Decoding uses the ordinary, full-length :class:`ropelm.KVCache` and attends to
its last ``window`` entries only (exact, simple; a rolling buffer of ``window``
entries would save memory but not time). Takes the options of RoPE-SM
(``n_kv_head``, context-extension ``scaling``) plus ``window``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from ropelm.plugins.rope_sm import RoPEAttention, RoPEOptions, check_even_head_size

import ropelm
from ropelm.config import ModelConfig

MIN_CHUNK, MAX_CHUNK = 32, 128  # query chunk c: large enough for efficient matmuls


@dataclasses.dataclass(frozen=True)
class RoPESlidingOptions(RoPEOptions):
    """``model.att_options`` of RoPE-Sliding: those of RoPE-SM plus the window.

    Attributes:
        window: keys each query sees, itself included (None: model.block_size // 4;
            set it explicitly when an evaluation changes block_size).
    """

    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


def band_mask(
    t_query: int, t_key: int, offset: int, window: int, device: torch.device
) -> torch.Tensor:
    """Bool (T, L): query i (position offset + i) sees key j iff 0 <= offset + i - j < window."""
    distance = (
        torch.arange(offset, offset + t_query, device=device)[:, None]
        - torch.arange(t_key, device=device)[None, :]
    )  # (T, L)
    return (distance >= 0) & (distance < window)


@functools.lru_cache(maxsize=8)
def dense_band_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """The (T, T) band mask of a training-time forward, cached per shape and device."""
    return band_mask(t, t, 0, window, device)


@functools.lru_cache(maxsize=8)
def chunk_band_mask(chunk: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool (c, c + w) for one query chunk against its keys, the first of which is w earlier.

    Query a (position i c + a) sees key b (position i c - w + b) iff a < b <= a + w.
    """
    a = torch.arange(chunk, device=device)[:, None]  # (c, 1)
    b = torch.arange(chunk + window, device=device)[None, :]  # (1, c + w)
    return (b > a) & (b <= a + window)


class SlidingRoPEAttention(RoPEAttention):
    """RoPE attention restricted to the last ``window`` positions."""

    def __init__(self, config: ModelConfig, options: RoPESlidingOptions) -> None:
        super().__init__(config, options)
        window = options.window if options.window is not None else config.block_size // 4
        self.window = max(1, window)
        self.chunk_size = min(max(self.window, MIN_CHUNK), MAX_CHUNK)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        # q (B, nh, T, hs); k, v (B, nkv, start + T, hs)
        T, w = q.size(2), self.window
        dropout_p = self.dropout if self.training else 0.0
        if start > 0:  # continuing a KV cache: only the last window keys can be seen
            low = max(0, start - w + 1)
            k, v = k[:, :, low:], v[:, :, low:]  # (B, nkv, L, hs), L <= w - 1 + T
            mask = None if T == 1 else band_mask(T, k.size(2), start - low, w, q.device)
        elif w >= T:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=self.gqa
            )
        elif 2 * self.chunk_size >= T:
            mask = dense_band_mask(T, w, q.device)  # (T, T)
        else:
            return self._chunked(q, k, v, dropout_p)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=self.gqa
        )

    def _chunked(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Banded attention over query chunks: O(T (c + w)) time and memory.

        The first h = ceil(w / c) chunks (whose windows would reach before position 0)
        form one dense band-masked block; every later chunk i attends to the c + w
        keys at positions [i c - w, (i + 1) c), all chunks in one batched SDPA call
        with the same (c, c + w) mask. Masks never depend on the batch size.
        """
        B, nh, T, hs = q.shape
        nkv, c, w = k.size(1), self.chunk_size, self.window
        n, h = math.ceil(T / c), math.ceil(w / c)
        sdpa = functools.partial(
            F.scaled_dot_product_attention, dropout_p=dropout_p, enable_gqa=self.gqa
        )
        if h >= n - 1:  # (almost) everything is head: one dense band-masked call
            return sdpa(q, k, v, attn_mask=dense_band_mask(T, w, q.device))
        pad, head = n * c - T, h * c
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # (B, *, n c, hs)
        y_head = sdpa(
            q[:, :, :head],
            k[:, :, :head],
            v[:, :, :head],
            attn_mask=dense_band_mask(head, w, q.device),
        )  # (B, nh, h c, hs)
        m = n - h  # chunks after the head
        q_rest = q[:, :, head:].view(B, nh, m, c, hs).transpose(1, 2).reshape(B * m, nh, c, hs)

        def windows(x: torch.Tensor) -> torch.Tensor:
            x = x[:, :, head - w :].unfold(2, c + w, c)  # (B, nkv, m, hs, c + w)
            return x.permute(0, 2, 1, 4, 3).reshape(B * m, nkv, c + w, hs)

        mask = chunk_band_mask(c, w, q.device)  # (c, c + w)
        y_rest = sdpa(q_rest, windows(k), windows(v), attn_mask=mask)  # (B m, nh, c, hs)
        y_rest = y_rest.view(B, m, nh, c, hs).transpose(1, 2).reshape(B, nh, m * c, hs)
        return torch.cat([y_head, y_rest], dim=2)[:, :, :T]  # (B, nh, T, hs)


def build(config: ModelConfig, options: RoPESlidingOptions) -> SlidingRoPEAttention:
    check_even_head_size(config, "RoPE-Sliding")
    return SlidingRoPEAttention(config, options)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-Sliding",
            description="RoPE + causal softmax over the last `window` positions (chunked SDPA).",
            reference="https://arxiv.org/abs/2004.05150",
            factory=build,
            options=RoPESlidingOptions,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
