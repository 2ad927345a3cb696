"""KERPLE-Power: a learnable power-law distance bias, as a ropelm plugin in one file.

Chi et al., 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation", https://arxiv.org/abs/2205.09921 (the power kernel, eq. 6).

The README's "Writing your own attention plugin" walks through this file. Like
every plugin it has three parts:

1. the **variant** -- :class:`PowerBias`, a ``score_mod`` with FlexAttention's
   signature ``(score, b, h, q_idx, kv_idx) -> score``. It adds
   ``-r1_h * |i - j| ** r2_h`` to the score of query i for key j. Because it is an
   ``nn.Module``, its parameters r1 and r2 are trained and saved with the model;
2. the **options** -- :class:`PowerOptions`, a frozen dataclass that ropelm fills
   from ``model.att_options`` and validates (unknown keys and wrong types are
   reported with their dotted path). Subclassing ``ropelm.SoftmaxOptions`` brings
   grouped-query attention (``n_kv_head``) and the logit soft-cap (``softcap``);
3. the **hook** -- :func:`ropelm_register_attention`, which registers an
   :class:`ropelm.AttentionSpec` whose factory returns a ``ropelm.SelfAttention``
   built with the score_mod. ropelm runs it on the fastest kernel that can:
   FlexAttention's fused kernel on a GPU, its dense reference elsewhere.

The kernel is conditionally positive definite for 0 < r2 <= 2, so r1 is kept
above ``eps`` and r2 in [eps, 2] by clamping where they are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import ropelm


@dataclasses.dataclass(frozen=True)
class PowerOptions(ropelm.SoftmaxOptions):
    """``model.att_options`` of KERPLE-Power.

    Attributes:
        eps: smallest value r1 and r2 take.
    """

    eps: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.eps < 2:
            raise ValueError(f"eps must be in (0, 2), got {self.eps}")


class PowerBias(nn.Module):
    """The score_mod: ``score - r1[h] * |q_idx - kv_idx| ** r2[h]``."""

    def __init__(self, n_head: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.r1 = nn.Parameter(torch.rand(n_head))  # (nh,) scale
        self.r2 = nn.Parameter(torch.rand(n_head) * 2)  # (nh,) exponent

    def forward(self, score, b, h, q_idx, kv_idx):
        r1 = self.r1[h].clamp(min=self.eps)
        r2 = self.r2[h].clamp(min=self.eps, max=2.0)
        distance = (q_idx - kv_idx).abs()
        # |d| ** r2 with 0 at d = 0; clamping the base keeps the gradient of r2 finite there
        power = distance.clamp(min=1).to(score.dtype) ** r2 * (distance > 0)
        return score - r1 * power


def build(config: ropelm.ModelConfig, options: PowerOptions) -> ropelm.SelfAttention:
    """The factory: ropelm calls it once per layer with the validated options."""
    return ropelm.SelfAttention(
        config,
        n_kv_head=options.n_kv_head,
        softcap=options.softcap,
        score_mod=PowerBias(config.n_head, options.eps),
    )


@ropelm.hookimpl
def ropelm_register_attention(register: Callable[[ropelm.AttentionSpec], None]) -> None:
    register(
        ropelm.AttentionSpec(
            name="KERPLE-Power",
            description="Learnable power-law distance bias per head, -r1 |i - j|^r2.",
            reference="https://arxiv.org/abs/2205.09921",
            factory=build,
            options=PowerOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
