"""ALiBi: attention with linear biases instead of position embeddings.

Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation, Press et al., 2022. https://arxiv.org/abs/2108.12409

Each head h adds the bias ``-m_h * (i - j)`` to the score of query i for key j
(j <= i), so attention decays linearly with distance at a head-specific rate.
The slopes m_h form the geometric sequence of the paper: for n heads (a power of
two) ``m_h = 2 ** (-8 h / n)``, h = 1..n; otherwise the n' = 2 ** floor(log2 n)
slopes of n' heads followed by every other slope of 2 n' heads, until n are taken
(the rule of the reference implementation).

The bias (with -inf above the diagonal) goes to SDPA as an additive float mask of
shape (1, nh, T, L) -- a 4-D mask keeps PyTorch's fused CPU kernel, a 3-D one was
measured 2-3x slower. Biases use absolute query/key positions, so decoding with
the KV cache is exact; there is no length limit (extrapolates).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import ropelm
from ropelm.attention import KVHeadOptions, SelfAttention
from ropelm.config import ModelConfig


def alibi_slopes(n_head: int) -> list[float]:
    """The per-head slopes m_1 .. m_n of the paper (largest first)."""
    if n_head < 1:
        raise ValueError(f"ALiBi needs at least one head, got {n_head}.")

    def power_of_two(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (h + 1) for h in range(n)]

    if math.log2(n_head).is_integer():
        return power_of_two(n_head)
    closest = 2 ** math.floor(math.log2(n_head))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_head - closest]


@functools.lru_cache(maxsize=8)
def alibi_mask(
    n_head: int, start: int, t_query: int, t_key: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (1, nh, T, L): -m_h * (i - j) for key j <= query i, else -inf.

    Queries sit at positions start..start+T-1, keys at 0..L-1. Built lazily and
    kept in a small cache shared by every layer (one copy per shape, not one per
    layer), never as a module buffer: ``Module.to`` must not cast it and
    checkpoints must not hold it. Training reuses one entry; each decoding step
    needs a new one, which is cheap (T = 1).
    """
    query_pos = torch.arange(start, start + t_query, device=device)[:, None]
    key_pos = torch.arange(t_key, device=device)[None, :]
    distance = (query_pos - key_pos).float()  # (T, L), i - j
    slopes = torch.tensor(alibi_slopes(n_head), device=device)[:, None, None]  # (nh, 1, 1)
    bias = (-slopes * distance).masked_fill(distance < 0, float("-inf"))  # (nh, T, L)
    return bias.to(dtype).unsqueeze(0)  # (1, nh, T, L)


class AlibiAttention(SelfAttention):
    """Causal softmax attention with ALiBi's per-head linear distance bias."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        # q (B, nh, T, hs); k, v (B, nkv, start + T, hs)
        mask = alibi_mask(self.n_head, start, q.size(2), k.size(2), q.device, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=self.gqa
        )  # (B, nh, T, hs)


def build(config: ModelConfig, options: KVHeadOptions) -> AlibiAttention:
    return AlibiAttention(config, n_kv_head=options.n_kv_head)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="ALiBi",
            description="Per-head linear distance bias on causal softmax scores (SDPA mask).",
            reference="https://arxiv.org/abs/2108.12409",
            factory=build,
            options=KVHeadOptions,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
