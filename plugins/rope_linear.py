"""RoPE-Linear: rotary position embedding with (causal) linear attention.

RoFormer, Su et al., 2021, section 3.3 (https://arxiv.org/abs/2104.09864), on
top of linear attention (Katharopoulos et al., 2020, https://arxiv.org/abs/2006.16236).

With the feature map phi(x) = elu(x) + 1 > 0 and R_m the RoPE rotation of
position m, query m reads (RoFormer eq. 19, made causal)::

    y_m = sum_{n<=m} (R_m phi(q_m))^T (R_n phi(k_n)) v_n  /  sum_{n<=m} phi(q_m)^T phi(k_n)

The rotation comes *after* the feature map and the normaliser uses the
un-rotated features, so it stays positive (the numerator weights may be
negative: the output is not a convex combination of values).

Computation, with no Python loop over positions:

* normaliser: phi(q_m) . cumsum_n phi(k_n) -- O(T hs);
* numerator, in chunks of ``chunk_size`` c: within a chunk a masked (c, c) score
  matrix; across chunks the running state S = sum_n (R_n phi(k_n)) v_n^T (hs, hs),
  an exclusive cumulative sum over chunk states. Time O(T c hs + T hs^2),
  memory O(T hs + (T / c) hs^2).

Decoding keeps no keys at all: the cache (:class:`LinearAttentionState`) is
the recurrent state (S, z = sum_n phi(k_n)), O(hs^2) per head whatever the
length, and one step costs O(hs^2). That is why it is *cheaper* than softmax
attention for long sequences (linear instead of quadratic time, constant
instead of growing cache) and *costlier* at short training lengths: for
T <= a few hundred the fused SDPA kernel beats several batched matmuls,
cumulative sums and elementwise feature maps, which run in float32 (sums over
many positions lose too much in bf16). Queries and keys take no 1/sqrt(hs)
scale: it would cancel between numerator and normaliser.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

import ropelm
from ropelm.config import ModelConfig
from ropelm.rope import RopeTables, apply_rotary_emb, check_even_head_size
from ropelm.self_attention import SelfAttention


@dataclasses.dataclass(frozen=True)
class RoPELinearOptions:
    """``model.att_options`` of RoPE-Linear.

    Attributes:
        chunk_size: positions per chunk of the training-time computation (speed and
            memory only; the result does not depend on it beyond float rounding).
        eps: added to the normaliser (which is > 0 already) against underflow.
    """

    chunk_size: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")


class LinearAttentionState:
    """The decoding cache of RoPE-Linear: running sums instead of keys and values.

    ``S`` (B, nh, hs, hs) = sum_n (R_n phi(k_n)) v_n^T and ``z`` (B, nh, hs) =
    sum_n phi(k_n), kept in float32 (float64 for float64 models) whatever the
    model dtype. ``length`` is the number of positions consumed. Unlike a
    :class:`ropelm.KVCache` it never fills up; ``max_len`` is not needed.
    """

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        head_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.S = torch.zeros(batch_size, n_head, head_size, head_size, device=device, dtype=dtype)
        self.z = torch.zeros(batch_size, n_head, head_size, device=device, dtype=dtype)
        self.length = 0


def causal_linear_attention(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    eps: float,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal RoPE linear attention over (B, nh, T, hs) inputs, continuing ``state``.

    Returns the output (B, nh, T, hs) and the state after the last position,
    ``S`` (B, nh, hs, hs) and ``z`` (B, nh, hs).
    """
    B, nh, T, hs = q_rot.shape
    S0, z0 = state if state is not None else (None, None)
    z = phi_k.cumsum(2)  # (B, nh, T, hs): sum_{n<=m} phi(k_n)
    if z0 is not None:
        z = z + z0[:, :, None]
    denom = (phi_q * z).sum(-1, keepdim=True) + eps  # (B, nh, T, 1)

    c = min(chunk_size, T)
    n = math.ceil(T / c)
    pad = n * c - T  # zero keys and values add nothing; padded queries are dropped
    qc, kc, vc = (F.pad(t, (0, 0, 0, pad)).view(B, nh, n, c, hs) for t in (q_rot, k_rot, v))
    within = torch.ones(c, c, dtype=torch.bool, device=q_rot.device).tril()  # (c, c)
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~within, 0.0)  # (B, nh, n, c, c)
    num = scores @ vc  # (B, nh, n, c, hs)
    kv = kc.transpose(-1, -2) @ vc  # (B, nh, n, hs, hs): each chunk's sum of k_rot v^T
    S_incl = kv.cumsum(2)  # (B, nh, n, hs, hs)
    S_before = torch.cat([torch.zeros_like(S_incl[:, :, :1]), S_incl[:, :, :-1]], dim=2)
    if S0 is not None:
        S_before = S_before + S0[:, :, None]
    num = num + qc @ S_before  # (B, nh, n, c, hs)
    y = num.view(B, nh, n * c, hs)[:, :, :T] / denom  # (B, nh, T, hs)
    S_last = S_incl[:, :, -1] if S0 is None else S_incl[:, :, -1] + S0
    return y, S_last, z[:, :, -1]


def document_linear_attention(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Causal linear attention within documents, (B, nh, T, hs), in its quadratic form.

    The running sums would have to restart at every document boundary inside a
    chunk; the (T, T) form with the block-causal mask computes the same sums
    directly (O(T^2), used only with ``train.document_mask``).
    """
    T = q_rot.size(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q_rot.device).tril()
    same = (document_ids[:, :, None] == document_ids[:, None, :]) & causal  # (B, T, T)
    keep = same[:, None].to(q_rot.dtype)  # (B, 1, T, T)
    num = ((q_rot @ k_rot.transpose(-1, -2)) * keep) @ v  # (B, nh, T, hs)
    denom = ((phi_q @ phi_k.transpose(-1, -2)) * keep).sum(-1, keepdim=True) + eps
    return num / denom


class RoPELinearAttention(SelfAttention):
    """Causal linear attention (phi = elu + 1) with RoPE applied to the features."""

    def __init__(self, config: ModelConfig, options: RoPELinearOptions) -> None:
        super().__init__(config)
        self.chunk_size = options.chunk_size
        self.eps = options.eps
        self.rope = RopeTables(self.head_size, base=config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        cache: LinearAttentionState | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(x)  # (B, nh, T, hs) each
        with torch.autocast(q.device.type, enabled=False):  # the sums need float32 (see below)
            y = self._attend(q, k, v, cache, document_ids)  # (B, nh, T, hs)
        return self.project_out(y.to(x.dtype))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LinearAttentionState | None,
        document_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Linear attention of (B, nh, T, hs) inputs in float32 at least, outside autocast:
        under fp16 autocast the growing state would overflow (values past 65,504)."""
        compute = torch.promote_types(q.dtype, torch.float32)
        start = cache.length if cache is not None else 0
        phi_q = F.elu(q.to(compute)) + 1.0  # (B, nh, T, hs)
        phi_k = F.elu(k.to(compute)) + 1.0
        cos, sin = self.rope.get(start, start + q.size(2), q.device, compute)  # (T, hs/2)
        q_rot, k_rot = apply_rotary_emb(phi_q, cos, sin), apply_rotary_emb(phi_k, cos, sin)
        if document_ids is not None:
            return document_linear_attention(
                q_rot, k_rot, phi_q, phi_k, v.to(compute), document_ids, self.eps
            )
        state = (cache.S, cache.z) if cache is not None else None
        y, S, z = causal_linear_attention(
            q_rot, k_rot, phi_q, phi_k, v.to(compute), self.chunk_size, self.eps, state
        )
        if cache is not None:
            cache.S, cache.z = S.to(cache.S.dtype), z.to(cache.z.dtype)
            cache.length += q.size(2)
        return y

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> LinearAttentionState:
        return LinearAttentionState(batch_size, self.n_head, self.head_size, device, dtype)


def build(config: ModelConfig, options: RoPELinearOptions) -> RoPELinearAttention:
    check_even_head_size(config, "RoPE-Linear")
    return RoPELinearAttention(config, options)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-Linear",
            description="RoPE on elu+1 features + causal linear attention; O(T) recurrent state.",
            reference="https://arxiv.org/abs/2104.09864",
            factory=build,
            options=RoPELinearOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
