"""RoPE-SM: rotary position embedding (real sine/cosine form) with softmax attention.

RoFormer: Enhanced Transformer with Rotary Position Embedding, Su et al., 2021.
https://arxiv.org/abs/2104.09864

Queries and keys are rotated pairwise (consecutive pairs, see ``ropelm.rope``) by
an angle proportional to their position, so the score q_m . k_n depends on the
offset m - n only. Attention is causal softmax through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels where available); a KV cache serves incremental decoding.
"""

from __future__ import annotations

from typing import Any

import torch

import ropelm
from ropelm.attention import SelfAttention
from ropelm.errors import ConfigError
from ropelm.model import ModelConfig
from ropelm.rope import RopeTables, apply_rotary_emb


def check_even_head_size(config: ModelConfig, variant: str) -> None:
    """RoPE rotates feature pairs, so the head size must be even."""
    if config.head_size % 2:
        raise ConfigError(
            f"model: attention '{variant}' needs an even head size, but n_embd / n_head = "
            f"{config.n_embd} / {config.n_head} = {config.head_size}; "
            "choose n_embd and n_head so that their quotient is even."
        )


class RoPEAttention(SelfAttention):
    """Causal softmax attention with queries and keys rotated by RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.rope = RopeTables(self.head_size, base=config.rope_theta)

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.size(2)
        cos, sin = self.rope.get(start, start + T, q.device, q.dtype)  # (T, hs/2) each
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)


def build(config: ModelConfig, options: Any) -> RoPEAttention:
    check_even_head_size(config, "RoPE-SM")
    return RoPEAttention(config)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-SM",
            description="Rotary position embedding (real sin/cos form) + causal softmax (SDPA).",
            reference="https://arxiv.org/abs/2104.09864",
            factory=build,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
