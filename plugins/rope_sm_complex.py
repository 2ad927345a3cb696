"""RoPE-SM-complex: RoPE computed by complex multiplication, with softmax attention.

RoFormer, Su et al., 2021, section 3.4.2 (https://arxiv.org/abs/2104.09864); the
complex form is the one popularised by the LLaMA reference code.

Each consecutive feature pair (x_{2i}, x_{2i+1}) is read as the complex number
x_{2i} + i x_{2i+1} and multiplied by e^{i m theta_i}. This is the same rotation
as ``RoPE-SM`` (same pairing, same angles); it exists to cross-check the real
form, and the two are tested to agree to 1e-5 (float32) and 1e-10 (float64).
It takes the same options as ``RoPE-SM`` (:class:`ropelm.rope.RoPEOptions`:
grouped-query attention, soft-cap and every context-extension scaling of
:mod:`ropelm.rope_scaling`); with YaRN the unit complex numbers get the magnitude
0.1 ln(s) + 1, exactly like the real tables, and ``dynamic`` past the original length
computes the rotation of each call at its end position, as :class:`ropelm.rope.RopeTables`.
"""

from __future__ import annotations

import torch

import ropelm
from ropelm.config import ModelConfig
from ropelm.rope import RoPEOptions, RopeScaling, check_even_head_size, rope_angles
from ropelm.self_attention import SelfAttention
from ropelm.tables import PositionTables


def complex_rotation(
    length: int,
    head_dim: int,
    base: float,
    scaling: RopeScaling | None,
    device: torch.device,
    start: int = 0,
    current_len: int | None = None,
) -> torch.Tensor:
    """Complex numbers a e^{i m theta_i} (T, hs/2), complex128, m = start .. start + length - 1;
    a = YaRN's factor or 1; ``current_len`` as in :func:`ropelm.rope.rope_inv_freq`."""
    angles = rope_angles(
        length,
        head_dim,
        base,
        start=start,
        scaling=scaling,
        current_len=current_len,
        device=device,
    )  # (T, hs/2) float64
    factor = scaling.attention_factor if scaling is not None else 1.0
    return torch.polar(torch.full_like(angles, factor), angles)  # (T, hs/2)


def apply_rotary_emb_complex(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by multiplying its pairs with ``rotation`` (T, hs/2)."""
    real_dtype = torch.float64 if rotation.dtype == torch.complex128 else torch.float32
    pairs = x.to(real_dtype).unflatten(-1, (-1, 2)).contiguous()  # (B, nh, T, hs/2, 2)
    rotated = torch.view_as_complex(pairs) * rotation  # (B, nh, T, hs/2) complex
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (B, nh, T, hs)


class ComplexRotaryEmbedding:
    """RoPE by complex multiplication, as the rotation part of a SelfAttention."""

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None) -> None:
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.tables = PositionTables(self._make)

    def _make(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
        rotation = complex_rotation(length, self.head_dim, self.base, self.scaling, device)
        return (rotation.to(dtype),)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # complex64 tables for float32 and narrower inputs, complex128 for float64
        dtype = torch.complex128 if q.dtype == torch.float64 else torch.complex64
        end = start + q.size(2)
        if self.scaling is not None and self.scaling.depends_on_length(end):  # dynamic past L
            rotation = complex_rotation(
                end - start, self.head_dim, self.base, self.scaling, q.device, start, end
            ).to(dtype)  # (T, hs/2)
        else:
            (rotation,) = self.tables.get(start, end, q.device, dtype)  # (T, hs/2)
        return apply_rotary_emb_complex(q, rotation), apply_rotary_emb_complex(k, rotation)


def build(config: ModelConfig, options: RoPEOptions) -> SelfAttention:
    check_even_head_size(config, "RoPE-SM-complex")
    rotation = ComplexRotaryEmbedding(
        config.head_size, config.rope_theta, options.rope_scaling(config)
    )
    return SelfAttention(
        config, n_kv_head=options.n_kv_head, softcap=options.softcap, rotation=rotation
    )


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-SM-complex",
            description="RoPE by complex multiplication + causal softmax; cross-checks RoPE-SM.",
            reference="https://arxiv.org/abs/2104.09864",
            factory=build,
            options=RoPEOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
