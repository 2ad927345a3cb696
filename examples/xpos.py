"""xPos: rotary position embedding with an exponential decay by distance, as a ropelm plugin.

Sun et al., 2022, "A Length-Extrapolatable Transformer", https://arxiv.org/abs/2212.10554

A second example beside ``my_attention.py``: a variant that changes how queries
and keys carry position gives ``ropelm.SelfAttention`` a *rotation* part, a
callable ``(q, k, start) -> (q, k)`` for queries and keys at positions
start .. start + T - 1 (``start`` is non-zero when decoding with the KV cache).

The maths: xPos rotates queries and keys exactly like RoPE and also scales
feature pair i of the query at position n by zeta_i ** (n / scale_base) and of
the key at position m by zeta_i ** (-m / scale_base), with
zeta_i = (i / (hs / 2) + gamma) / (1 + gamma) < 1. A score q_n . k_m then
carries the factor zeta_i ** ((n - m) / scale_base): attention to distant keys
is damped, which is what helps xPos extrapolate. Both scalings are folded into
RoPE's cos/sin tables (a ``ropelm.PositionTables``: per device, grown on demand,
never module buffers), so the rotation is one ``ropelm.apply_rotary_emb`` call.
Positions count from 0 (the paper centres them on the middle of the window).
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


class XPosRotation:
    """The rotation part: xPos-scaled RoPE of queries and keys (B, nh, T, hs)."""

    def __init__(self, head_size: int, rope_theta: float, options: XPosOptions) -> None:
        self.head_size, self.rope_theta, self.options = head_size, rope_theta, options
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

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_cos, q_sin, k_cos, k_sin = self.tables.get(
            start, start + q.size(2), q.device, torch.float32
        )
        return ropelm.apply_rotary_emb(q, q_cos, q_sin), ropelm.apply_rotary_emb(k, k_cos, k_sin)


def build(config: ropelm.ModelConfig, options: XPosOptions) -> ropelm.SelfAttention:
    """The factory: ropelm calls it once per layer with the validated options."""
    if config.head_size % 2:
        raise ropelm.ConfigError(
            f"model: attention 'xPos' rotates feature pairs and needs an even head size, "
            f"but n_embd / n_head = {config.n_embd} / {config.n_head} = {config.head_size}."
        )
    rotation = XPosRotation(config.head_size, config.rope_theta, options)
    return ropelm.SelfAttention(config, rotation=rotation)


@ropelm.hookimpl
def ropelm_register_attention(register: Callable[[ropelm.AttentionSpec], None]) -> None:
    register(
        ropelm.AttentionSpec(
            name="xPos",
            description="RoPE with an exponential decay by distance (length-extrapolatable).",
            reference="https://arxiv.org/abs/2212.10554",
            factory=build,
            options=XPosOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
