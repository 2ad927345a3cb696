"""RoPE-SM: rotary position embedding (real sine/cosine form) with softmax attention.

RoFormer: Enhanced Transformer with Rotary Position Embedding, Su et al., 2021.
https://arxiv.org/abs/2104.09864

Queries and keys are rotated pairwise (consecutive pairs, see ``ropelm.rope``) by
an angle proportional to their position, so the score q_m . k_n depends on the
offset m - n only. Attention is causal softmax through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels where available); a KV cache serves incremental decoding.

Options (:class:`RoPEOptions`, shared by the softmax RoPE variants):

* ``n_kv_head`` -- grouped-query attention (https://arxiv.org/abs/2305.13245);
  1 is multi-query attention (https://arxiv.org/abs/1911.02150). Changes the
  shape of ``c_attn``, so it must match the checkpoint.
* ``scaling`` (``none | linear | ntk | yarn``), ``scale_factor``,
  ``original_max_len``, ``yarn_alpha``, ``yarn_beta`` -- context extension (see
  :class:`ropelm.rope.RopeScaling`). They change only the RoPE tables, never the
  parameters: load a checkpoint trained with ``scaling: none`` into a model with
  ``scaling: yarn, scale_factor: 4`` to evaluate at 4x the training length.
"""

from __future__ import annotations

import dataclasses

import torch

import ropelm
from ropelm.attention import KVHeadOptions, SelfAttention
from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.rope import RopeScaling, RopeTables, ScalingKind, apply_rotary_emb


@dataclasses.dataclass(frozen=True)
class RoPEOptions(KVHeadOptions):
    """``model.att_options`` of RoPE-SM and RoPE-SM-complex: ``n_kv_head`` and scaling.

    Attributes:
        scaling: RoPE context-extension method; ``none`` keeps the trained tables.
        scale_factor: extension factor s >= 1 (must stay 1 with ``scaling: none``).
        original_max_len: training context length L for YaRN (None: model.block_size).
        yarn_alpha, yarn_beta: YaRN ramp bounds (paper: 1 and 32).
    """

    scaling: ScalingKind = "none"
    scale_factor: float = 1.0
    original_max_len: int | None = None
    yarn_alpha: float = 1.0
    yarn_beta: float = 32.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scale_factor >= 1.0:
            raise ValueError(f"scale_factor must be >= 1, got {self.scale_factor}")
        if self.scaling == "none" and self.scale_factor != 1.0:
            raise ValueError(
                f"scale_factor={self.scale_factor} has no effect with scaling 'none'; "
                "set scaling to linear, ntk or yarn, or remove scale_factor"
            )
        if self.original_max_len is not None and self.original_max_len < 1:
            raise ValueError(f"original_max_len must be >= 1, got {self.original_max_len}")
        if not 0.0 <= self.yarn_alpha < self.yarn_beta:
            raise ValueError(
                f"need 0 <= yarn_alpha < yarn_beta, got {self.yarn_alpha} and {self.yarn_beta}"
            )

    def rope_scaling(self, config: ModelConfig) -> RopeScaling | None:
        """The :class:`RopeScaling` these options ask for (None for ``scaling: none``)."""
        if self.scaling == "none":
            return None
        return RopeScaling(
            kind=self.scaling,
            factor=self.scale_factor,
            original_max_len=self.original_max_len or config.block_size,
            alpha=self.yarn_alpha,
            beta=self.yarn_beta,
        )


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

    def __init__(self, config: ModelConfig, options: RoPEOptions) -> None:
        super().__init__(config, n_kv_head=options.n_kv_head)
        self.rope = RopeTables(
            self.head_size, base=config.rope_theta, scaling=options.rope_scaling(config)
        )

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.size(2)
        cos, sin = self.rope.get(start, start + T, q.device, q.dtype)  # (T, hs/2) each
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)


def build(config: ModelConfig, options: RoPEOptions) -> RoPEAttention:
    check_even_head_size(config, "RoPE-SM")
    return RoPEAttention(config, options)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-SM",
            description="Rotary position embedding (real sin/cos form) + causal softmax (SDPA).",
            reference="https://arxiv.org/abs/2104.09864",
            factory=build,
            options=RoPEOptions,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
