"""T5-Bias: a learned bias per head and relative-position bucket, added to the scores.

Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer, Raffel et al., 2020, section 2.1. https://arxiv.org/abs/1910.10683

Each head h adds ``table[h, bucket(i - j)]`` to the score of query i for key j.
Buckets are logarithmic in the distance (the decoder's, unidirectional form):
distances below ``num_buckets // 2`` get a bucket each; larger ones share
``num_buckets // 2`` buckets spaced logarithmically up to ``max_distance``,
beyond which every distance falls in the last bucket. So the bias is learned
for short distances in detail and for long ones coarsely, and any distance
has one (extrapolates, as far as the last bucket's value carries).

T5 shares one table across the layers of a stack; here each layer learns its
own (as in later re-implementations), since every layer is its own plugin
module. The table starts at N(0, n_embd^-1/2) (T5's initialisation) and is a
``score_mod`` reading a parameter: FlexAttention backpropagates into it on the
GPU, the dense backend recomputes the bias each training step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import ropelm
from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.self_attention import SelfAttention


@dataclasses.dataclass(frozen=True)
class T5BiasOptions(SoftmaxOptions):
    """``model.att_options`` of T5-Bias: those of every softmax variant and the buckets.

    Attributes:
        num_buckets: buckets of relative distance (T5: 32).
        max_distance: distance from which on everything shares the last bucket (T5: 128).
    """

    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {self.num_buckets}")
        if not self.max_distance > self.num_buckets // 2:
            raise ValueError(
                f"max_distance must exceed num_buckets // 2 = {self.num_buckets // 2}, "
                f"got {self.max_distance}"
            )


def relative_bucket(
    distance: torch.Tensor, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of a causal distance i - j >= 0 (int tensor of any shape)."""
    exact = num_buckets // 2
    distance = distance.clamp(min=0)
    log_ratio = torch.log(distance.clamp(min=1).to(torch.float32) / exact)
    far = exact + (log_ratio / math.log(max_distance / exact) * (num_buckets - exact)).to(
        distance.dtype
    )
    return torch.where(distance < exact, distance, far.clamp(max=num_buckets - 1))


class T5RelativeBias(nn.Module):
    """The score_mod: ``score + table[h, bucket(q_idx - kv_idx)]``."""

    def __init__(self, n_head: int, n_embd: int, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table = nn.Parameter(torch.randn(n_head, num_buckets) * n_embd**-0.5)  # (nh, nb)

    def forward(self, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
        bucket = relative_bucket(q_idx - kv_idx, self.num_buckets, self.max_distance)
        return score + self.table[h, bucket]

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}"


def build(config: ModelConfig, options: T5BiasOptions) -> SelfAttention:
    bias = T5RelativeBias(config.n_head, config.n_embd, options.num_buckets, options.max_distance)
    return SelfAttention(
        config, n_kv_head=options.n_kv_head, softcap=options.softcap, score_mod=bias
    )


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="T5-Bias",
            description="Learned bias per head and log-spaced relative-distance bucket (T5).",
            reference="https://arxiv.org/abs/1910.10683",
            factory=build,
            options=T5BiasOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
