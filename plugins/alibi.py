"""ALiBi: attention with linear biases instead of position embeddings.

Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation, Press et al., 2022. https://arxiv.org/abs/2108.12409

Each head h adds the bias ``-m_h * (i - j)`` to the score of query i for key j
(j <= i), so attention decays linearly with distance at a head-specific rate.
The slopes m_h form the geometric sequence of the paper: for n heads (a power of
two) ``m_h = 2 ** (-8 h / n)``, h = 1..n; otherwise the c = 2 ** floor(log2 n)
slopes of c heads followed by every other slope of 2 c heads, until n are taken
(the rule of the reference implementation).

The bias is a ``score_mod`` (:func:`alibi_score_mod`): FlexAttention applies it
inside its fused kernel, the dense backend materializes it once per length and
skips the causal upper triangle. The slope is computed from the head index in
float32 (no table to keep on a device or to round to bf16). Biases use absolute
query/key positions, so decoding with the KV cache is exact; there is no length
limit (extrapolates).
"""

from __future__ import annotations

import math

import torch

import ropelm
from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.masks import ScoreMod
from ropelm.self_attention import SelfAttention


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


def alibi_score_mod(n_head: int) -> ScoreMod:
    """score - m_h * (q_idx - kv_idx), with m_h the paper's slope of head h (0-based).

    The first c = 2 ** floor(log2 n) heads take 2 ** (-8 (h + 1) / c); the others
    the odd-numbered slopes of 2 c heads, 2 ** (-4 (2 (h - c) + 1) / c).
    """
    closest = 2 ** math.floor(math.log2(n_head))

    def alibi(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
              q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
        head = h.to(torch.float32)
        slope = torch.where(
            head < closest,
            torch.exp2(-8.0 * (head + 1) / closest),
            torch.exp2(-4.0 * (2 * (head - closest) + 1) / closest),
        )
        return score - slope * (q_idx - kv_idx)

    return alibi


def build(config: ModelConfig, options: SoftmaxOptions) -> SelfAttention:
    return SelfAttention(
        config,
        n_kv_head=options.n_kv_head,
        softcap=options.softcap,
        score_mod=alibi_score_mod(config.n_head),
    )


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="ALiBi",
            description="Per-head linear distance bias on causal softmax scores (score_mod).",
            reference="https://arxiv.org/abs/2108.12409",
            factory=build,
            options=SoftmaxOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
