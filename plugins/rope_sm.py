"""RoPE-SM: rotary position embedding (real sine/cosine form) with softmax attention.

RoFormer: Enhanced Transformer with Rotary Position Embedding, Su et al., 2021.
https://arxiv.org/abs/2104.09864

Queries and keys are rotated pairwise (consecutive pairs, see ``ropelm.rope``) by
an angle proportional to their position, so the score q_m . k_n depends on the
offset m - n only. Nothing else changes, so the attention runs on SDPA's fused
causal kernel (the ``sdpa`` backend); a KV cache serves incremental decoding.

Options (:class:`ropelm.rope.RoPEOptions`, shared by the softmax RoPE variants):
``n_kv_head`` (grouped-query attention) and ``softcap`` (logit soft-cap, which
moves the layer to the flex or dense backend), and the context-extension
``scaling`` (``none | linear | ntk | dynamic | yarn | llama3 | abf``), ``scale_factor``,
``original_max_position_embeddings``, ``beta_fast``, ``beta_slow`` (YaRN),
``low_freq_factor``, ``high_freq_factor`` (Llama 3.1) and ``new_base`` (ABF) (see
:mod:`ropelm.rope_scaling`), which change only the RoPE tables, never the
parameters. ``dynamic`` past the original length makes cached decoding differ from
one full forward pass, as in transformers (see :class:`ropelm.rope.RopeTables`).
"""

from __future__ import annotations

import ropelm
from ropelm.config import ModelConfig
from ropelm.rope import RoPEOptions, check_even_head_size
from ropelm.self_attention import SelfAttention


def build(config: ModelConfig, options: RoPEOptions) -> SelfAttention:
    check_even_head_size(config, "RoPE-SM")
    return SelfAttention(
        config,
        n_kv_head=options.n_kv_head,
        softcap=options.softcap,
        rotation=options.rotary_embedding(config),
    )


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="RoPE-SM",
            description="Rotary position embedding (real sin/cos form) + causal softmax (SDPA).",
            reference="https://arxiv.org/abs/2104.09864",
            factory=build,
            options=RoPEOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
