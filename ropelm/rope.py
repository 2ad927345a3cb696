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

Context-window extension (:class:`ropelm.rope_scaling.RopeScaling`: linear, ntk,
dynamic, yarn, llama3, abf) changes only the frequencies (and, for YaRN, the magnitude
of the tables), never the parameters, so a model trained without scaling can be
evaluated with it; the formulas live in :mod:`ropelm.rope_scaling`. ``dynamic`` is the
one whose frequencies depend on the length reached (start + T of a forward pass): see
:class:`RopeTables` for what that means with a KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.rope_scaling import (
    OPTION_APPLIES_TO,
    RopeScaling,
    ScalingKind,
    check_scaling_values,
    default_inv_freq,
)
from ropelm.tables import PositionTables, table_dtype


def rope_inv_freq(
    head_dim: int,
    base: float = 10000.0,
    *,
    scaling: RopeScaling | None = None,
    current_len: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Frequencies theta_i = base ** (-2i / hs) in float64, shape (hs/2,), after ``scaling``.

    ``current_len`` is the length the sequence has reached, read by ``dynamic`` scaling
    only (None: the original length, i.e. the trained frequencies).
    """
    if scaling is None:
        return default_inv_freq(head_dim, base, device)
    return scaling.inv_freq(head_dim, base, current_len=current_len, device=device)


def rope_angles(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    *,
    start: int = 0,
    position_scale: float = 1.0,
    scaling: RopeScaling | None = None,
    current_len: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Angles m * theta_i in float64, shape (seq_len, head_dim // 2), m = start, start + 1, ...

    ``position_scale`` multiplies the positions (< 1 is linear position interpolation);
    ``scaling`` rescales the frequencies (see :class:`RopeScaling`), at ``current_len``
    for ``dynamic`` scaling (see :func:`rope_inv_freq`).
    """
    inv_freq = rope_inv_freq(
        head_dim, base, scaling=scaling, current_len=current_len, device=device
    )  # (hs/2,)
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
    current_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute the RoPE tables ``(cos, sin)``, each of shape (seq_len, head_dim // 2).

    Row m holds cos(m * theta_i) and sin(m * theta_i). ``dtype`` must be float32
    or float64: tables are never kept in half precision. With YaRN ``scaling`` both
    tables are multiplied by its attention factor (see :class:`RopeScaling`);
    ``dynamic`` scaling computes the frequencies at ``current_len`` (None: the
    original length, i.e. the trained frequencies).
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
        current_len=current_len,
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

    ``dynamic`` scaling: a call that ends at or below the original length L reads the
    cached trained tables; one that ends past it (end = start + T > L) gets tables
    computed for that call at L_cur = end, for all its positions. Under cached decoding
    the keys already in the KV cache keep the rotation of the step that wrote them (as
    in transformers, whose ``dynamic`` recomputes the frequencies as the length grows
    and never re-rotates cached keys), so past L decoding token by token does not
    reproduce one forward pass over the whole sequence, whose every position uses
    L_cur = the full length; up to L the two agree exactly. ropelm reads L_cur from
    each call afresh, where transformers keeps the largest length seen until a
    sequence shorter than L resets it; for one growing sequence the two coincide.
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

        float64 for float64 inputs, else float32 (:func:`ropelm.tables.table_dtype`);
        computed for this call when ``dynamic`` scaling runs past the original length.
        """
        dtype = table_dtype(x_dtype)
        if self.scaling is not None and self.scaling.depends_on_length(end):
            return build_rope_cache(
                end - start, self.head_dim, self.base, dtype=dtype, device=device, start=start,
                position_scale=self.position_scale, scaling=self.scaling, current_len=end,
            )  # fmt: skip
        cos, sin = self._tables.get(start, end, device, dtype)
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
    (``n_kv_head``, ``softcap``) and context-extension scaling (:mod:`ropelm.rope_scaling`).

    Attributes:
        scaling: ``none`` (the trained tables), ``linear``, ``ntk``, ``dynamic``, ``yarn``,
            ``llama3`` or ``abf``.
        scale_factor: extension factor s >= 1; stays 1 with ``none`` and ``abf``.
        original_max_position_embeddings: training context length L of ``dynamic``,
            ``yarn`` and ``llama3`` (None: model.block_size).
        beta_fast, beta_slow: YaRN's ramp bounds in rotations over L (reference: 32, 1).
        low_freq_factor, high_freq_factor: Llama 3.1's wavelength bounds L / factor
            (reference: 1, 4).
        new_base: the raised base (rope_theta) of ``abf``, required with it.

    Scaling changes only the RoPE tables, never the parameters: load a checkpoint
    trained with ``scaling: none`` into a model with ``scaling: yarn, scale_factor: 4``
    to evaluate it at 4x the training length. A method-specific option given with
    another ``scaling`` is an error, not silently ignored.
    """

    scaling: ScalingKind = "none"
    scale_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    new_base: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        defaults = {field.name: field.default for field in dataclasses.fields(RoPEOptions)}
        for name, kinds in OPTION_APPLIES_TO.items():
            if getattr(self, name) != defaults[name] and self.scaling not in kinds:
                raise ValueError(
                    f"{name} applies to scaling {' or '.join(kinds)} only, not "
                    f"'{self.scaling}'; remove it or change scaling"
                )
        check_scaling_values(
            self.scaling, self.scale_factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow,
            low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
            new_base=self.new_base,
        )  # fmt: skip
        original = self.original_max_position_embeddings
        if original is not None and original < 1:
            raise ValueError(f"original_max_position_embeddings must be >= 1, got {original}")

    def rope_scaling(self, config: ModelConfig) -> RopeScaling | None:
        """The :class:`RopeScaling` these options ask for (None for ``scaling: none``)."""
        if self.scaling == "none":
            return None
        return RopeScaling(
            kind=self.scaling,
            factor=self.scale_factor,
            original_max_position_embeddings=self.original_max_position_embeddings
            or config.block_size,
            beta_fast=self.beta_fast,
            beta_slow=self.beta_slow,
            low_freq_factor=self.low_freq_factor,
            high_freq_factor=self.high_freq_factor,
            new_base=self.new_base,
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
