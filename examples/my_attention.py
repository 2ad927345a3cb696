"""xPos: rotary position embedding with an exponential decay by distance, as a ropelm plugin.

Sun et al., 2022, "A Length-Extrapolatable Transformer", https://arxiv.org/abs/2212.10554

This one file is the whole plugin; the README's "Writing your own attention
plugin" walks through it. It has the three parts every plugin has:

1. the **module** -- :class:`XPosAttention`, an ``nn.Module`` mapping (B, T, C) to
   (B, T, C). It subclasses :class:`ropelm.SelfAttention` (fused QKV projection,
   causal SDPA, KV cache, output projection) and overrides one method,
   ``position_qk``, which gives queries and keys their position;
2. the **options** -- :class:`XPosOptions`, a frozen dataclass that ropelm fills
   from ``model.att_options`` in the YAML and validates (unknown keys and wrong
   types are reported with their dotted path);
3. the **hook** -- :func:`ropelm_register_attention`, which registers an
   :class:`ropelm.AttentionSpec` (name, description, paper, factory, options,
   capabilities).

The maths: xPos rotates queries and keys exactly like RoPE and also scales
feature pair i of the query at position n by zeta_i ** (n / scale_base) and of
the key at position m by zeta_i ** (-m / scale_base), with
zeta_i = (i / (hs / 2) + gamma) / (1 + gamma) < 1. A score q_n . k_m then
carries the factor zeta_i ** ((n - m) / scale_base): attention to distant keys
is damped, which is what helps xPos extrapolate. Both scalings are folded into
RoPE's cos/sin tables, so the rotation is one ``ropelm.apply_rotary_emb`` call.

Positions count from 0 (the paper centres them on the middle of the window); with
absolute positions the KV cache needs nothing special: a cached key keeps the
scale of its own position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

import ropelm


@dataclasses.dataclass(frozen=True)
class XPosOptions:
    """``model.att_options`` of xPos.

    Attributes:
        scale_base: distance (in tokens) over which the decay factor zeta_i applies once.
        gamma: sets zeta_i = (i / (hs / 2) + gamma) / (1 + gamma); larger is a weaker decay.
    """

    scale_base: float = 512.0
    gamma: float = 0.4

    def __post_init__(self) -> None:
        if not self.scale_base > 0:
            raise ValueError(f"scale_base must be > 0, got {self.scale_base}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")


class XPosAttention(ropelm.SelfAttention):
    """Causal softmax attention with xPos (scaled RoPE) queries and keys."""

    def __init__(self, config: ropelm.ModelConfig, options: XPosOptions) -> None:
        super().__init__(config)
        if self.head_size % 2:
            raise ropelm.ConfigError(
                f"model: attention 'xPos' rotates feature pairs and needs an even head size, "
                f"but n_embd / n_head = {config.n_embd} / {config.n_head} = {self.head_size}."
            )
        self.rope_theta = config.rope_theta
        self.options = options
        # tables for positions 0..L-1, per device, grown on demand; not buffers, so they
        # never reach a checkpoint and Module.to(torch.bfloat16) does not round them
        self.tables = ropelm.PositionTables(self._xpos_tables)

    def _xpos_tables(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """Query tables (cos, sin) * scale and key tables / scale, each (length, hs/2)."""
        cos, sin = ropelm.build_rope_cache(
            length, self.head_size, self.rope_theta, dtype=torch.float64, device=device
        )  # (L, hs/2) each
        half = self.head_size // 2
        pair = torch.arange(half, dtype=torch.float64, device=device)
        zeta = (pair / half + self.options.gamma) / (1 + self.options.gamma)  # (hs/2,)
        position = torch.arange(length, dtype=torch.float64, device=device)[:, None]
        scale = zeta ** (position / self.options.scale_base)  # (L, hs/2)
        return tuple(t.to(dtype) for t in (cos * scale, sin * scale, cos / scale, sin / scale))

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k (B, nh, T, hs) at positions start .. start + T - 1
        q_cos, q_sin, k_cos, k_sin = self.tables.get(
            start, start + q.size(2), q.device, torch.float32
        )
        return ropelm.apply_rotary_emb(q, q_cos, q_sin), ropelm.apply_rotary_emb(k, k_cos, k_sin)


def build(config: ropelm.ModelConfig, options: XPosOptions) -> XPosAttention:
    """The factory: ropelm calls it once per layer with the validated options."""
    return XPosAttention(config, options)


@ropelm.hookimpl
def ropelm_register_attention(register: Callable[[ropelm.AttentionSpec], None]) -> None:
    register(
        ropelm.AttentionSpec(
            name="xPos",
            description="RoPE with an exponential decay by distance (length-extrapolatable).",
            reference="https://arxiv.org/abs/2212.10554",
            factory=build,
            options=XPosOptions,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
