"""Sinusoidal-APE: fixed sinusoidal absolute position embeddings + causal softmax.

Attention Is All You Need, Vaswani et al., 2017, section 3.5.
https://arxiv.org/abs/1706.03762

At the model input each position m gets (through ``AttentionSpec.position_embedding``)::

    PE(m, 2i)     = scale * sin(m / base ** (2i / C))
    PE(m, 2i + 1) = scale * cos(m / base ** (2i / C))

added to the token embeddings; attention itself is NoPE-style causal softmax.
There are no parameters, and any position can be computed, so the variant
runs beyond ``block_size`` (extrapolates). The table is computed in float64,
kept in float32 per device and grown on demand (not a buffer: ``Module.to``
must not round it to bf16, checkpoints must not hold it); the model casts the
sum to the token embeddings' dtype.

``scale`` keeps the paper's *balance* between token and position signal, not
its raw amplitude: the paper multiplies token embeddings by sqrt(C) (their
per-element size is then ~1, like the sinusoids'), while ropelm's shared model
keeps token embeddings at their initial std of 0.02. With amplitude 1 the
position signal would swamp the tokens 35 to 1 (measured on the quickstart:
validation perplexity 420 against 130-170 for every other variant), so the
default amplitude is :data:`DEFAULT_SCALE` = 0.02 * sqrt(2), which gives the
sinusoids the same root-mean-square as the token embeddings at initialisation.
Set ``scale: 1.0`` for the paper's raw amplitude.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import ropelm
from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.self_attention import SelfAttention
from ropelm.tables import PositionTables

#: RMS of the sinusoids equal to the token embeddings' init std (0.02); see the module doc.
DEFAULT_SCALE = 0.02 * 2**0.5


@dataclasses.dataclass(frozen=True)
class SinusoidalAPEOptions(SoftmaxOptions):
    """``model.att_options`` of Sinusoidal-APE: ``n_kv_head`` and the embedding's shape.

    Attributes:
        base: wavelength base (the paper's 10000).
        scale: amplitude of the embedding (default: RMS equal to the token embeddings').
    """

    base: float = 10000.0
    scale: float = DEFAULT_SCALE

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base > 1.0:
            raise ValueError(f"base must be > 1, got {self.base}")
        if not self.scale > 0.0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The embeddings of positions 0..length-1, shape (length, dim), float64, amplitude 1."""
    positions = torch.arange(length, dtype=torch.float64)[:, None]  # (T, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (C/2,)
    angles = positions * inv_freq  # (T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (T, C) interleaved


class SinusoidalPositionEmbedding(nn.Module):
    """Positions start..start+T-1 -> (T, C) float32 sinusoids; no parameters, any position."""

    def __init__(self, dim: int, base: float = 10000.0, scale: float = 1.0) -> None:
        super().__init__()
        self.dim, self.base, self.scale = dim, base, scale
        self._table = PositionTables(self._make)
        # an empty buffer that follows Module.to(device): where the table must be
        self.register_buffer("_device", torch.empty(0), persistent=False)

    def _make(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
        table = self.scale * sinusoidal_table(length, self.dim, self.base)  # (T, C) float64
        return (table.to(device=device, dtype=dtype),)

    def forward(self, start: int, length: int) -> torch.Tensor:
        """Sinusoids (length, C) of positions start..start+length-1 (a slice: no host sync)."""
        device = self._device.device
        (table,) = self._table.get(start, start + length, device, torch.float32)
        return table  # (T, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scale={self.scale}"


def build(config: ModelConfig, options: SinusoidalAPEOptions) -> SelfAttention:
    return SelfAttention(config, n_kv_head=options.n_kv_head, softcap=options.softcap)


def build_position_embedding(
    config: ModelConfig, options: SinusoidalAPEOptions
) -> SinusoidalPositionEmbedding:
    if config.n_embd % 2:
        raise ConfigError(
            f"model.n_embd: Sinusoidal-APE pairs sine and cosine features, so n_embd must be "
            f"even; got {config.n_embd}."
        )
    return SinusoidalPositionEmbedding(config.n_embd, options.base, options.scale)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="Sinusoidal-APE",
            description="Fixed sinusoidal absolute positions at the input (Vaswani) + softmax.",
            reference="https://arxiv.org/abs/1706.03762",
            factory=build,
            options=SinusoidalAPEOptions,
            capabilities=ropelm.Capabilities(
                causal=True,
                kv_cache=True,
                extrapolates=True,
                input_position_embedding=True,
                document_mask=True,
            ),
            position_embedding=build_position_embedding,
        )
    )
