"""KERPLE-Log: a learnable logarithmic distance bias per head.

KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation,
Chi et al., 2022 (NeurIPS). https://arxiv.org/abs/2205.09921

Each head h adds ``-r1_h * log(1 + r2_h * |i - j|)`` to the score of query i for
key j: a conditionally positive definite kernel of the distance, shifted into a
bias. ALiBi is the linear special case (-r |i - j|); the logarithm decays more
slowly, which the paper finds better at length extrapolation. r1 and r2 are
trained, kept positive by clamping at ``eps`` where they are used, and start
uniform in (0, 2) and (0, 1), as in the authors' code. The bias is a
``score_mod`` reading parameters (see ``ropelm.masks``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import ropelm
from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.self_attention import SelfAttention


@dataclasses.dataclass(frozen=True)
class KerpleOptions(SoftmaxOptions):
    """``model.att_options`` of KERPLE-Log: those of every softmax variant and ``eps``.

    Attributes:
        eps: smallest value r1 and r2 take (the authors' 1e-2).
    """

    eps: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


class KerpleLogBias(nn.Module):
    """The score_mod: ``score - r1[h] * log(1 + r2[h] * |q_idx - kv_idx|)``."""

    def __init__(self, n_head: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.r1 = nn.Parameter(torch.rand(n_head) * 2)  # (nh,)
        self.r2 = nn.Parameter(torch.rand(n_head))  # (nh,)

    def forward(self, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
        r1, r2 = self.r1[h].clamp(min=self.eps), self.r2[h].clamp(min=self.eps)
        return score - r1 * torch.log1p(r2 * (q_idx - kv_idx).abs())

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def build(config: ModelConfig, options: KerpleOptions) -> SelfAttention:
    return SelfAttention(
        config,
        n_kv_head=options.n_kv_head,
        softcap=options.softcap,
        score_mod=KerpleLogBias(config.n_head, options.eps),
    )


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="KERPLE-Log",
            description="Learnable logarithmic distance bias per head, -r1 log(1 + r2 |i-j|).",
            reference="https://arxiv.org/abs/2205.09921",
            factory=build,
            options=KerpleOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
