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

Context-window extension (:class:`RopeScaling`) changes only the frequencies
(and, for YaRN, the magnitude of the tables), never the parameters, so a model
trained without scaling can be evaluated with it:

* ``linear`` -- position interpolation (Chen et al., 2023,
  https://arxiv.org/abs/2306.15595): theta_i / s, i.e. position m acts as m / s.
* ``ntk`` -- NTK-aware base scaling
  (https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/):
  base' = base * s ** (hs / (hs - 2)); high frequencies barely move, the lowest
  one is interpolated by exactly s.
* ``yarn`` -- YaRN (Peng et al., 2023, https://arxiv.org/abs/2309.00071), "NTK-by-parts"
  plus temperature. With L the original context length, lambda_i = 2 pi / theta_i
  and r_i = L / lambda_i (how many turns dimension i makes over L)::

      gamma_i = 0 if r_i < alpha, 1 if r_i > beta, (r_i - alpha) / (beta - alpha) otherwise
      theta'_i = (1 - gamma_i) * theta_i / s + gamma_i * theta_i

  and the logits are divided by the temperature t with sqrt(1 / t) = 0.1 ln(s) + 1:
  both cos and sin tables are multiplied by 0.1 ln(s) + 1, so q . k scales by its
  square once q and k are rotated (the paper's "scale both q and k" form).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.tables import PositionTables, table_dtype

ScalingKind = Literal["none", "linear", "ntk", "yarn"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are rescaled to run beyond the training context length.

    Attributes:
        kind: ``none``, ``linear`` (position interpolation), ``ntk`` (NTK-aware base
            scaling) or ``yarn`` (NTK-by-parts ramp + attention temperature).
        factor: the context extension factor s (>= 1): evaluate at s times ``original_max_len``.
        original_max_len: the training context length L (``yarn`` only).
        alpha, beta: YaRN's ramp bounds on r = L / wavelength (paper: 1 and 32).
    """

    kind: ScalingKind = "none"
    factor: float = 1.0
    original_max_len: int | None = None
    alpha: float = 1.0
    beta: float = 32.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "ntk", "yarn"):
            raise ValueError(f"RoPE scaling must be none, linear, ntk or yarn; got {self.kind!r}.")
        if not self.factor >= 1.0:
            raise ValueError(f"RoPE scale factor must be >= 1, got {self.factor}.")
        if self.kind == "yarn" and (self.original_max_len is None or self.original_max_len < 1):
            raise ValueError("YaRN scaling needs original_max_len, the training context length.")
        if not 0.0 <= self.alpha < self.beta:
            raise ValueError(f"YaRN needs 0 <= alpha < beta, got {self.alpha}, {self.beta}.")

    @property
    def attention_factor(self) -> float:
        """Multiplier of the cos/sin tables: YaRN's sqrt(1/t) = 0.1 ln(s) + 1, else 1."""
        if self.kind == "yarn" and self.factor > 1.0:
            return 0.1 * math.log(self.factor) + 1.0
        return 1.0

    def inv_freq(
        self, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The scaled frequencies theta'_i in float64, shape (head_dim // 2,)."""
        return rope_inv_freq(head_dim, base, scaling=self, device=device)


def rope_inv_freq(
    head_dim: int,
    base: float = 10000.0,
    *,
    scaling: RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Frequencies theta_i = base ** (-2i / hs) in float64, shape (hs/2,), after ``scaling``."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive, even head size; got {head_dim}.")
    kind = scaling.kind if scaling is not None else "none"
    if kind == "ntk":
        if head_dim <= 2:
            raise ValueError("NTK-aware scaling needs a head size above 2.")
        base = base * scaling.factor ** (head_dim / (head_dim - 2))
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    )
    if kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif kind == "yarn":
        turns = scaling.original_max_len * inv_freq / (2 * math.pi)  # r_i = L / lambda_i
        gamma = ((turns - scaling.alpha) / (scaling.beta - scaling.alpha)).clamp(0.0, 1.0)
        inv_freq = (1.0 - gamma) * inv_freq / scaling.factor + gamma * inv_freq
    return inv_freq


def rope_angles(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    *,
    start: int = 0,
    position_scale: float = 1.0,
    scaling: RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Angles m * theta_i in float64, shape (seq_len, head_dim // 2), m = start, start + 1, ...

    ``position_scale`` multiplies the positions (< 1 is linear position interpolation);
    ``scaling`` rescales the frequencies (see :class:`RopeScaling`).
    """
    inv_freq = rope_inv_freq(head_dim, base, scaling=scaling, device=device)  # (hs/2,)
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
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute the RoPE tables ``(cos, sin)``, each of shape (seq_len, head_dim // 2).

    Row m holds cos(m * theta_i) and sin(m * theta_i). ``dtype`` must be float32
    or float64: tables are never kept in half precision. With YaRN ``scaling`` both
    tables are multiplied by its attention factor (see :class:`RopeScaling`).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"RoPE tables are kept in float32 or float64, not {dtype}.")
    angles = rope_angles(
        seq_len,
        head_dim,
        base,
        start=start,
        position_scale=position_scale,
        scaling=scaling,
        device=device,
    )
    cos, sin = angles.cos(), angles.sin()  # (T, hs/2) float64
    factor = scaling.attention_factor if scaling is not None else 1.0
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the tables ``cos, sin`` (T, hs/2).

    The rotation runs in the tables' precision (x is upcast if it is narrower)
    and the result has x's dtype.

    The backward pass is the transposed rotation (the same three kernels with
    ``-sin``) instead of autograd's trace of the forward pass, which costs ~10
    elementwise kernels; tables that require grad fall back to that trace.
    """
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return _rotate(x, cos, sin)
    return _Rotate.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation itself: one full-width multiply and two multiply-adds on the pairs."""
    compute_dtype = torch.promote_types(x.dtype, cos.dtype)
    x_c = x.to(compute_dtype)
    # x_j * cos(theta_{j // 2}) for every feature j; the interleaved table keeps the
    # innermost loop contiguous (a broadcast over the pair axis of size 2 would not).
    out = x_c * cos.repeat_interleave(2, dim=-1)  # (B, nh, T, hs), laid out like x
    # (B, nh, T, hs/2) strided views; slices, not unbind, so autograd allows the in-place
    # updates when it traces this function (tables that require grad, double backward)
    out[..., 0::2].addcmul_(x_c[..., 1::2], sin, value=-1)  # x'_2i = x_2i cos - x_2i+1 sin
    out[..., 1::2].addcmul_(x_c[..., 0::2], sin)  # x'_2i+1 = x_2i sin + x_2i+1 cos
    return out.to(x.dtype)


class _Rotate(torch.autograd.Function):
    """RoPE rotation whose gradient is the transposed rotation: R(theta)^T = R(-theta)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


class RopeTables:
    """RoPE tables per (device, dtype), grown on demand (see :class:`ropelm.tables.PositionTables`).

    Kept outside the module's buffers on purpose: ``Module.to(torch.bfloat16)``
    must not cast them, and they are derived state that has no place in a
    checkpoint.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        position_scale: float = 1.0,
        scaling: RopeScaling | None = None,
    ) -> None:
        self.head_dim = head_dim
        self.base = base
        self.position_scale = position_scale
        self.scaling = scaling
        self._tables = PositionTables(self._make)

    def _make(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return build_rope_cache(
            length,
            self.head_dim,
            self.base,
            dtype=dtype,
            device=device,
            position_scale=self.position_scale,
            scaling=self.scaling,
        )

    def get(
        self, start: int, end: int, device: torch.device, x_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables (cos, sin) for positions start..end-1, each (end - start, hs/2).

        float64 for float64 inputs, else float32 (:func:`ropelm.tables.table_dtype`).
        """
        cos, sin = self._tables.get(start, end, device, table_dtype(x_dtype))
        return cos, sin


class RotaryEmbedding:
    """RoPE as the rotation part of a :class:`ropelm.SelfAttention`: (q, k, start) -> (q, k).

    Queries and keys (B, nh|nkv, T, hs) at positions start..start+T-1 are rotated
    with tables kept in float32 (float64 for float64 inputs), whatever the model's dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None):
        self.tables = RopeTables(head_dim, base=base, scaling=scaling)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables.get(start, start + q.size(2), q.device, q.dtype)  # (T, hs/2) each
        return apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)


@dataclasses.dataclass(frozen=True)
class RoPEOptions(SoftmaxOptions):
    """``model.att_options`` of the softmax RoPE variants: those of every softmax variant
    (``n_kv_head``, ``softcap``) and context-extension scaling.

    Attributes:
        scaling: RoPE context-extension method; ``none`` keeps the trained tables.
        scale_factor: extension factor s >= 1 (must stay 1 with ``scaling: none``).
        original_max_len: training context length L for YaRN (None: model.block_size).
        yarn_alpha, yarn_beta: YaRN ramp bounds (paper: 1 and 32).

    Scaling changes only the RoPE tables, never the parameters: load a checkpoint
    trained with ``scaling: none`` into a model with ``scaling: yarn, scale_factor: 4``
    to evaluate it at 4x the training length.
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

    def rotary_embedding(self, config: ModelConfig) -> RotaryEmbedding:
        """The rotation of a model with ``config`` under these options."""
        return RotaryEmbedding(config.head_size, config.rope_theta, self.rope_scaling(config))


def check_even_head_size(config: ModelConfig, variant: str) -> None:
    """RoPE rotates feature pairs, so the head size must be even."""
    if config.head_size % 2:
        raise ConfigError(
            f"model: attention '{variant}' needs an even head size, but n_embd / n_head = "
            f"{config.n_embd} / {config.n_head} = {config.head_size}; "
            "choose n_embd and n_head so that their quotient is even."
        )
