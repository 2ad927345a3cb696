"""Rotary position embedding (RoPE) in real sine/cosine form.

RoFormer (Su et al., 2021, https://arxiv.org/abs/2104.09864) rotates each pair
of query/key features by an angle proportional to the token position::

    theta_i = base ** (-2i / hs),               i = 0 .. hs/2 - 1
    angle(m, i) = m * theta_i                   (m = position)
    [x'_{2i}  ]   [cos  -sin] [x_{2i}  ]
    [x'_{2i+1}] = [sin   cos] [x_{2i+1}]

Pairing convention: **consecutive pairs** (features 2i and 2i+1), as in the
RoFormer paper and the original ropelm design; not the half-split pairing
(i, i + hs/2) of GPT-NeoX. The complex-number plugin ``RoPE-SM-complex`` uses
the same pairing and must agree with this module.

The tables are computed in float64 and stored in float32 (float64 when asked),
whatever dtype the model trains in: a bf16 table would lose the angle at large
positions. No complex numbers are used on this path.
"""

from __future__ import annotations

import torch


def rope_angles(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    *,
    start: int = 0,
    position_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Angles m * theta_i in float64, shape (seq_len, head_dim // 2), m = start, start + 1, ...

    ``position_scale`` multiplies the positions (< 1 is linear position interpolation).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive, even head size; got {head_dim}.")
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    )
    positions = torch.arange(start, start + seq_len, dtype=torch.float64, device=device)
    return torch.outer(positions * position_scale, inv_freq)  # (T, hs/2)


def build_rope_cache(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    start: int = 0,
    position_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute the RoPE tables ``(cos, sin)``, each of shape (seq_len, head_dim // 2).

    Row m holds cos(m * theta_i) and sin(m * theta_i). ``dtype`` must be float32
    or float64: tables are never kept in half precision.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"RoPE tables are kept in float32 or float64, not {dtype}.")
    angles = rope_angles(
        seq_len, head_dim, base, start=start, position_scale=position_scale, device=device
    )
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the tables ``cos, sin`` (T, hs/2).

    The rotation runs in the tables' precision (x is upcast if it is narrower)
    and the result has x's dtype.
    """
    compute_dtype = torch.promote_types(x.dtype, cos.dtype)
    pairs = x.to(compute_dtype).unflatten(-1, (-1, 2))  # (B, nh, T, hs/2, 2)
    x_even, x_odd = pairs.unbind(-1)  # (B, nh, T, hs/2) each
    rotated = torch.stack(
        (x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1
    )  # (B, nh, T, hs/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (B, nh, T, hs)


class RopeTables:
    """Lazily built RoPE tables per (device, dtype), grown on demand.

    Kept outside the module's buffers on purpose: ``Module.to(torch.bfloat16)``
    must not cast them, and they are derived state that has no place in a
    checkpoint.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, position_scale: float = 1.0) -> None:
        self.head_dim = head_dim
        self.base = base
        self.position_scale = position_scale
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, start: int, end: int, device: torch.device, x_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions start..end-1, float64 for float64 inputs, else float32."""
        dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
        key = (device, dtype)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.size(0) < end:
            length = max(end, 2 * cos.size(0) if cos is not None else end)
            cos, sin = build_rope_cache(
                length,
                self.head_dim,
                self.base,
                dtype=dtype,
                device=device,
                position_scale=self.position_scale,
            )
            self._tables[key] = (cos, sin)
        return cos[start:end], sin[start:end]
