"""RoPE-SM-complex: RoPE computed by complex multiplication, with softmax attention.

RoFormer, Su et al., 2021, section 3.4.2 (https://arxiv.org/abs/2104.09864); the
complex form is the one popularised by the LLaMA reference code.

Each consecutive feature pair (x_{2i}, x_{2i+1}) is read as the complex number
x_{2i} + i x_{2i+1} and multiplied by e^{i m theta_i}. This is the same rotation
as ``RoPE-SM`` (same pairing, same angles); it exists to cross-check the real
form, and the two are tested to agree to 1e-5 (float32) and 1e-10 (float64).
It takes the same options as ``RoPE-SM`` (:class:`RoPEOptions`: grouped-query
attention and context-extension scaling); with YaRN the unit complex numbers get
the magnitude 0.1 ln(s) + 1, exactly like the real tables.
"""

from __future__ import annotations

import torch
from ropelm.plugins.rope_sm import RoPEOptions, check_even_head_size

import ropelm
from ropelm.attention import SelfAttention
from ropelm.config import ModelConfig
from ropelm.rope import RopeScaling, rope_angles
from ropelm.tables import PositionTables


def complex_rotation(
    length: int, head_dim: int, base: float, scaling: RopeScaling | None, device: torch.device
) -> torch.Tensor:
    """Complex numbers a e^{i m theta_i} (T, hs/2), complex128; a = YaRN's factor or 1."""
    angles = rope_angles(length, head_dim, base, scaling=scaling, device=device)  # float64
    factor = scaling.attention_factor if scaling is not None else 1.0
    return torch.polar(torch.full_like(angles, factor), angles)  # (T, hs/2)


def apply_rotary_emb_complex(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by multiplying its pairs with ``rotation`` (T, hs/2)."""
    real_dtype = torch.float64 if rotation.dtype == torch.complex128 else torch.float32
    pairs = x.to(real_dtype).unflatten(-1, (-1, 2)).contiguous()  # (B, nh, T, hs/2, 2)
    rotated = torch.view_as_complex(pairs) * rotation  # (B, nh, T, hs/2) complex
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)  # (B, nh, T, hs)


class ComplexRoPEAttention(SelfAttention):
    """Causal softmax attention with RoPE applied as a complex multiplication."""

    def __init__(self, config: ModelConfig, options: RoPEOptions) -> None:
        super().__init__(config, n_kv_head=options.n_kv_head)
        self.rope_theta = config.rope_theta
        self.scaling = options.rope_scaling(config)
        self.rotation = PositionTables(self._make_rotation)

    def _make_rotation(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor]:
        rotation = complex_rotation(length, self.head_size, self.rope_theta, self.scaling, device)
        return (rotation.to(dtype),)

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # complex64 tables for float32 and narrower inputs, complex128 for float64
        dtype = torch.complex128 if q.dtype == torch.float64 else torch.complex64
        (rotation,) = self.rotation.get(start, start + q.size(2), q.device, dtype)  # (T, hs/2)
        return apply_rotary_emb_complex(q, rotation), apply_rotary_emb_complex(k, rotation)


def build(config: ModelConfig, options: RoPEOptions) -> ComplexRoPEAttention:
    check_even_head_size(config, "RoPE-SM-complex")
    return ComplexRoPEAttention(config, options)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-SM-complex",
            description="RoPE by complex multiplication + causal softmax; cross-checks RoPE-SM.",
            reference="https://arxiv.org/abs/2104.09864",
            factory=build,
            options=RoPEOptions,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
