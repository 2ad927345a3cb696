"""RoPE-Sliding: sliding-window (local) causal softmax attention with RoPE.

Local attention as in the Sparse Transformer's "strided/local" patterns (Child et
al., 2019, https://arxiv.org/abs/1904.10509), Longformer (Beltagy et al., 2020,
https://arxiv.org/abs/2004.05150) and Mistral 7B (Jiang et al., 2023,
https://arxiv.org/abs/2310.06825), with RoPE (https://arxiv.org/abs/2104.09864).

Query i sees keys j with 0 <= i - j < ``window``: the last ``window`` positions,
itself included. The window is a ``mask_mod`` (:func:`ropelm.masks.sliding_window`),
so its cost follows the window, not the length: FlexAttention's block mask skips
every block outside the band, and the dense backend runs each chunk of queries
against the chunk + window keys it can see (the same holds for a decoding step
with the KV cache, which reads only the last ``window`` cached keys). Takes the
options of RoPE-SM (``n_kv_head``, ``softcap``, context-extension ``scaling``)
plus ``window``.
"""

from __future__ import annotations

import dataclasses

import ropelm
from ropelm.config import ModelConfig
from ropelm.masks import sliding_window
from ropelm.rope import RoPEOptions, check_even_head_size
from ropelm.self_attention import SelfAttention


@dataclasses.dataclass(frozen=True)
class RoPESlidingOptions(RoPEOptions):
    """``model.att_options`` of RoPE-Sliding: those of RoPE-SM plus the window.

    Attributes:
        window: keys each query sees, itself included (None: model.block_size // 4;
            set it explicitly when an evaluation changes block_size).
    """

    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


def build(config: ModelConfig, options: RoPESlidingOptions) -> SelfAttention:
    check_even_head_size(config, "RoPE-Sliding")
    window = options.window if options.window is not None else max(1, config.block_size // 4)
    return SelfAttention(
        config,
        n_kv_head=options.n_kv_head,
        softcap=options.softcap,
        rotation=options.rotary_embedding(config),
        mask_mod=sliding_window(window),
    )


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-Sliding",
            description="RoPE + causal softmax over the last `window` positions (mask_mod).",
            reference="https://arxiv.org/abs/2004.05150",
            factory=build,
            options=RoPESlidingOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
