"""RoPE context-extension scalings: new frequencies for running past the training length.

Every method maps the trained frequencies theta_i = base ** (-2i / hs), i = 0 .. hs/2 - 1,
to new ones (YaRN also scales the magnitude of the cos/sin tables); none of them adds
parameters, so a model trained without scaling can be evaluated with any of them. The
formulas are those of the reference implementations -- Hugging Face transformers
(``transformers/modeling_rope_utils.py``), which vLLM and llama.cpp follow -- with
s = ``factor`` and L = ``original_max_position_embeddings`` (the training context length):

* ``linear`` -- position interpolation (Chen et al., 2023, https://arxiv.org/abs/2306.15595):
  theta_i / s, i.e. position m acts as m / s.
* ``ntk`` -- NTK-aware base scaling (bloc97, https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/):
  base' = base * s ** (hs / (hs - 2)); the highest frequency stays, the lowest is divided by s.
* ``dynamic`` -- dynamic NTK (emozilla, https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/;
  transformers ``_compute_dynamic_ntk_parameters``): NTK scaling whose base follows the current
  length L_cur, base' = base * (s * L_cur / L - (s - 1)) ** (hs / (hs - 2)) when L_cur > L,
  the trained frequencies when L_cur <= L (see :meth:`RopeScaling.depends_on_length`).
* ``yarn`` -- YaRN (Peng et al., 2023, https://arxiv.org/abs/2309.00071), "NTK-by-parts" as the
  authors' code and transformers ``_compute_yarn_parameters`` compute it: a linear ramp in the
  *pair index* between the correction dimensions of ``beta_fast`` and ``beta_slow`` rotations
  (:func:`yarn_correction_range`), blending theta_i (below the range, extrapolated) with
  theta_i / s (above it, interpolated), plus the attention factor 0.1 ln(s) + 1 on both tables.
* ``llama3`` -- Llama 3.1 (Dubey et al., 2024, https://arxiv.org/abs/2407.21783; transformers
  ``_compute_llama3_parameters``): wavelengths longer than L / ``low_freq_factor`` divided by s,
  shorter than L / ``high_freq_factor`` kept, a smooth blend in between.
* ``abf`` -- adjusted base frequency (Xiong et al., 2023, https://arxiv.org/abs/2309.16039):
  the base (``rope_theta``) raised to ``new_base`` at extension time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import torch

ScalingKind = Literal["none", "linear", "ntk", "dynamic", "yarn", "llama3", "abf"]
SCALING_KINDS: tuple[str, ...] = get_args(ScalingKind)

# the scalings each method-specific option applies to (the rest ignore it)
OPTION_APPLIES_TO: dict[str, tuple[str, ...]] = {
    "original_max_position_embeddings": ("dynamic", "yarn", "llama3"),
    "beta_fast": ("yarn",),
    "beta_slow": ("yarn",),
    "low_freq_factor": ("llama3",),
    "high_freq_factor": ("llama3",),
    "new_base": ("abf",),
}


def default_inv_freq(
    head_dim: int, base: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The trained frequencies theta_i = base ** (-2i / hs) in float64, shape (hs/2,)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive, even head size; got {head_dim}.")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def ntk_base(base: float, head_dim: int, factor: float) -> float:
    """NTK-aware base base * s ** (hs / (hs - 2)) (https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/)."""
    if head_dim <= 2:
        raise ValueError(f"NTK-aware scaling needs a head size above 2, got {head_dim}.")
    return base * factor ** (head_dim / (head_dim - 2))


def dynamic_ntk_base(
    base: float, head_dim: int, factor: float, current_len: int | None, original_len: int
) -> float:
    """Dynamic NTK base at length ``current_len`` (transformers ``_compute_dynamic_ntk_parameters``,
    https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/): ``base`` up to ``original_len``
    (None: the original length), base * (s L_cur / L - (s - 1)) ** (hs / (hs - 2)) beyond."""
    if head_dim <= 2:
        raise ValueError(f"dynamic NTK scaling needs a head size above 2, got {head_dim}.")
    if current_len is None or current_len <= original_len:
        return base
    return base * (factor * current_len / original_len - (factor - 1)) ** (
        head_dim / (head_dim - 2)
    )


def yarn_correction_dim(rotations: float, head_dim: int, base: float, original_len: int) -> float:
    """The pair index i whose frequency makes ``rotations`` turns over ``original_len`` positions:
    the inverse of r_i = L theta_i / (2 pi) (YaRN, https://arxiv.org/abs/2309.00071)."""
    return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, head_dim: int, base: float, original_len: int
) -> tuple[int, int]:
    """The ramp's bounds (low, high) in pair indices, as the reference ``find_correction_range``:
    floor of the ``beta_fast`` dimension, ceil of the ``beta_slow`` one, clamped to [0, hs - 1]."""
    if not base > 1.0:
        raise ValueError(f"YaRN needs a RoPE base above 1, got {base}.")
    low = math.floor(yarn_correction_dim(beta_fast, head_dim, base, original_len))
    high = math.ceil(yarn_correction_dim(beta_slow, head_dim, base, original_len))
    return max(low, 0), min(high, head_dim - 1)


def yarn_inv_freq(
    inv_freq: torch.Tensor,
    base: float,
    factor: float,
    original_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies (https://arxiv.org/abs/2309.00071) from the trained
    ``inv_freq`` (hs/2,): pair indices below the correction range keep theta_i, those above
    get theta_i / s, with a linear ramp in the index between (transformers
    ``_compute_yarn_parameters``, including its guard against an empty range)."""
    head_dim = 2 * inv_freq.numel()
    low, high = yarn_correction_range(beta_fast, beta_slow, head_dim, base, original_len)
    width = high - low if high != low else 0.001  # the reference's guard against 0 / 0
    index = torch.arange(head_dim // 2, dtype=torch.float64, device=inv_freq.device)  # (hs/2,)
    ramp = ((index - low) / width).clamp(0.0, 1.0)  # 0: extrapolate (keep), 1: interpolate
    return inv_freq * (1.0 - ramp) + (inv_freq / factor) * ramp


def yarn_attention_factor(factor: float) -> float:
    """YaRN's sqrt(1 / t) = 0.1 ln(s) + 1 (https://arxiv.org/abs/2309.00071); 1 for s <= 1."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def llama3_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    original_len: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> torch.Tensor:
    """Llama 3.1's frequencies (https://arxiv.org/abs/2407.21783; transformers
    ``_compute_llama3_parameters``) from the trained ``inv_freq`` (hs/2,): wavelengths above
    L / low_freq_factor divided by s, below L / high_freq_factor kept, and in between
    (1 - a) theta / s + a theta with a = (L / wavelength - low) / (high - low)."""
    wavelength = 2 * math.pi / inv_freq  # (hs/2,)
    smooth = (original_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq  # (hs/2,)
    out = torch.where(wavelength > original_len / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelength < original_len / high_freq_factor, inv_freq, out)


def check_scaling_values(
    kind: str,
    factor: float,
    *,
    beta_fast: float,
    beta_slow: float,
    low_freq_factor: float,
    high_freq_factor: float,
    new_base: float | None,
) -> None:
    """ValueError, in one sentence naming the option, for a bad value of a scaling option."""
    if kind not in SCALING_KINDS:
        raise ValueError(f"RoPE scaling must be one of {', '.join(SCALING_KINDS)}; got {kind!r}")
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(f"scale_factor must be >= 1, got {factor}")
    if kind in ("none", "abf") and factor != 1.0:
        instead = "set scaling to linear, ntk, dynamic, yarn or llama3, or remove scale_factor"
        if kind == "abf":
            instead = "abf extends the context through new_base alone, so remove scale_factor"
        raise ValueError(f"scale_factor={factor} has no effect with scaling '{kind}'; {instead}")
    if not 0.0 < beta_slow < beta_fast:
        raise ValueError(
            f"YaRN needs 0 < beta_slow < beta_fast, got beta_slow={beta_slow} and "
            f"beta_fast={beta_fast}"
        )
    if not 0.0 < low_freq_factor < high_freq_factor:
        raise ValueError(
            f"llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"low_freq_factor={low_freq_factor} and high_freq_factor={high_freq_factor}"
        )
    if kind == "abf" and new_base is None:
        raise ValueError("scaling 'abf' needs new_base, the raised RoPE base to evaluate with")
    if new_base is not None and not (math.isfinite(new_base) and new_base > 0.0):
        raise ValueError(f"new_base must be a positive number, got {new_base}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are rescaled to run beyond the training context length.

    Attributes:
        kind: one of :data:`SCALING_KINDS` (see the module docstring for each method).
        factor: the extension factor s >= 1 (the ``scale_factor`` option); 1 with ``abf``.
        original_max_position_embeddings: the training context length L (``dynamic``,
            ``yarn`` and ``llama3`` need it).
        beta_fast, beta_slow: YaRN's ramp bounds in rotations over L (reference: 32 and 1).
        low_freq_factor, high_freq_factor: Llama 3.1's wavelength bounds L / factor
            (reference: 1 and 4).
        new_base: the raised base of ``abf``.
    """

    kind: ScalingKind = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    new_base: float | None = None

    def __post_init__(self) -> None:
        check_scaling_values(
            self.kind, self.factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow,
            low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
            new_base=self.new_base,
        )  # fmt: skip
        original = self.original_max_position_embeddings
        if self.kind in OPTION_APPLIES_TO["original_max_position_embeddings"] and (
            original is None or original < 1
        ):
            raise ValueError(
                f"scaling '{self.kind}' needs original_max_position_embeddings >= 1, the "
                f"training context length; got {original}."
            )

    @property
    def attention_factor(self) -> float:
        """Multiplier of the cos/sin tables: YaRN's 0.1 ln(s) + 1, else 1."""
        return yarn_attention_factor(self.factor) if self.kind == "yarn" else 1.0

    def depends_on_length(self, end: int) -> bool:
        """True when a forward pass ending at position ``end`` (start + T) needs frequencies
        other than those at the original length: ``dynamic`` scaling past L."""
        original = self.original_max_position_embeddings
        return self.kind == "dynamic" and original is not None and end > original

    def inv_freq(
        self,
        head_dim: int,
        base: float = 10000.0,
        *,
        current_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The scaled frequencies in float64, shape (head_dim // 2,).

        ``current_len`` is the length L_cur the sequence has reached; only ``dynamic``
        reads it (None: the original length, i.e. the trained frequencies).
        """
        original = self.original_max_position_embeddings
        if self.kind == "ntk":
            return default_inv_freq(head_dim, ntk_base(base, head_dim, self.factor), device)
        if self.kind == "dynamic":
            new_base = dynamic_ntk_base(base, head_dim, self.factor, current_len, original)
            return default_inv_freq(head_dim, new_base, device)
        if self.kind == "abf":
            return default_inv_freq(head_dim, self.new_base, device)
        inv_freq = default_inv_freq(head_dim, base, device)  # (hs/2,)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "yarn":
            return yarn_inv_freq(
                inv_freq, base, self.factor, original, self.beta_fast, self.beta_slow
            )
        if self.kind == "llama3":
            return llama3_inv_freq(
                inv_freq, self.factor, original, self.low_freq_factor, self.high_freq_factor
            )
        return inv_freq
