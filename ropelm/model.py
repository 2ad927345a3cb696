"""The transformer language model: embeddings, pre-LayerNorm blocks, final norm, LM head.

The attention layer of every block comes from the variant the registry resolved
for ``config.att_type`` (:class:`ropelm.attention.ResolvedAttention`); everything
else is shared by all variants, so a comparison between variants changes one
thing only. ``ModelConfig`` itself lives in :mod:`ropelm.config` (it needs no
torch) and is re-exported here, where the original design named it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ropelm.attention import AttentionSpec, ResolvedAttention
from ropelm.config import ModelConfig
from ropelm.dense_attention import DensePlans
from ropelm.self_attention import SelfAttention

if TYPE_CHECKING:
    from ropelm.registry import Registry

__all__ = ["MLP", "Block", "DecodeState", "ModelConfig", "TransformerLM"]


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> GELU -> C."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, attn: nn.Module) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attn
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: Any = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        # only the arguments in use reach the attention (a plugin's module may take fewer)
        extra = {"cache": cache} if cache is not None else {}
        if document_ids is not None:
            extra["document_ids"] = document_ids
        x = x + self.attn(self.ln_1(x), **extra)
        return x + self.mlp(self.ln_2(x))


@dataclass
class DecodeState:
    """Per-layer caches and the position of the next token, for incremental decoding."""

    caches: list[Any] = field(default_factory=list)
    position: int = 0


class TransformerLM(nn.Module):
    """Decoder-only language model whose attention is a registered plugin variant.

    ``attention`` comes from ``registry.resolve(config)``, which a command does
    once; :meth:`from_config` is the shortcut for notebooks and scripts.
    """

    def __init__(self, config: ModelConfig, attention: ResolvedAttention) -> None:
        super().__init__()
        if attention.name != config.att_type:
            raise ValueError(
                f"attention {attention.name!r} was resolved for another att_type than "
                f"{config.att_type!r}"
            )
        self.config = config
        self.attention = attention
        # recompute each block in the backward pass instead of keeping its activations
        self.activation_checkpointing = False
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = attention.build_position_embedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, attention.build_layer(config)) for _ in range(config.n_layer)
        )
        plans = DensePlans()  # the dense backend's masks and biases: layers share equal ones
        for module in self.blocks.modules():
            if isinstance(module, SelfAttention):
                module.share_dense_plans(plans)
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        self.apply(self._init_weights)
        # GPT-2 scaling: residual projections shrink with depth so the stream stays O(1).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_config(cls, config: ModelConfig, registry: Registry | None = None) -> TransformerLM:
        """Resolve ``config``'s attention with ``registry`` and build the model.

        The convenience for interactive use: without ``registry`` it builds the
        default one (built-in plugins and installed entry points) on every call.
        Commands and library code build the registry once and pass
        ``registry.resolve(config)`` to the constructor instead.
        """
        if registry is None:
            from ropelm.registry import Registry

            registry = Registry.default()
        return cls(config, registry.resolve(config))

    @property
    def spec(self) -> AttentionSpec:
        """The attention variant's registered spec (name, capabilities, ...)."""
        return self.attention.spec

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def attention_backend(self) -> str:
        """The kernel attention ran on in the latest forward pass (``sdpa``, ``flex``,
        ``dense``; ``module`` for a variant computing attention in its own module)."""
        ran = {getattr(block.attn, "last_backend", None) or "module" for block in self.blocks}
        return ran.pop() if len(ran) == 1 else "+".join(sorted(ran))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        state: DecodeState | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids ``idx`` (B, T), and the loss if ``targets`` is given.

        The loss is the mean cross-entropy over target tokens other than
        ``pad_token_id``. With ``state`` (from :meth:`init_decode_state`), ``idx``
        continues the sequence held in the caches and ``state.position`` advances.
        With ``document_ids`` (B, T) (:func:`ropelm.masks.document_ids`), attention
        stays within documents (variants that declare ``capabilities.document_mask``).
        """
        _, T = idx.shape
        start = state.position if state is not None else 0
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            # (T, C) broadcast over B, in the token embeddings' dtype: a parameter-free
            # embedding (sinusoids) computes in float32 whatever dtype the model is in
            x = x + self.pos_emb(start, T).to(x.dtype)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            cache = state.caches[i] if state is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cache, document_ids, use_reentrant=False)
            else:
                x = block(x, cache, document_ids)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if state is not None:
            state.position += T
        loss = None
        if targets is not None:
            ignore = self.config.pad_token_id if self.config.pad_token_id is not None else -100
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore
            )
        return logits, loss

    def init_decode_state(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecodeState:
        """Empty caches for decoding up to ``max_len`` positions (variants with a KV cache)."""
        if not self.spec.capabilities.kv_cache:
            raise ValueError(f"Attention '{self.spec.name}' declares no KV cache.")
        param = next(self.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        caches = [
            block.attn.init_cache(batch_size, max_len, device, dtype) for block in self.blocks
        ]
        return DecodeState(caches=caches)
