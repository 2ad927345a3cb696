"""ropelm: train transformer language models and compare attention variants fairly.

Public API::

    from ropelm import ModelConfig, TransformerLM, Registry, AttentionSpec, hookimpl

Names are imported on first use (PEP 562), so ``import ropelm.config`` or
``import ropelm.tokenizer`` costs no torch import: a plugin module's
``import ropelm; @ropelm.hookimpl`` and the data pipeline stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ropelm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PluginError,
    RopelmError,
    UnknownAttentionError,
    UnsupportedModelError,
)
from ropelm.hookspecs import hookimpl

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "AttentionLayer": "ropelm.attention",
    "AttentionSpec": "ropelm.attention",
    "Capabilities": "ropelm.attention",
    "KVCache": "ropelm.self_attention",
    "ResolvedAttention": "ropelm.attention",
    "SelfAttention": "ropelm.self_attention",
    "SoftmaxOptions": "ropelm.attention",
    "ModelConfig": "ropelm.config",
    "DecodeState": "ropelm.model",
    "TransformerLM": "ropelm.model",
    "Registry": "ropelm.registry",
    "PositionTables": "ropelm.tables",
    "RoPEOptions": "ropelm.rope",
    "RotaryEmbedding": "ropelm.rope",
    "apply_rotary_emb": "ropelm.rope",
    "build_rope_cache": "ropelm.rope",
}

if TYPE_CHECKING:
    from ropelm.attention import (
        AttentionLayer,
        AttentionSpec,
        Capabilities,
        ResolvedAttention,
        SoftmaxOptions,
    )
    from ropelm.config import ModelConfig
    from ropelm.model import DecodeState, TransformerLM
    from ropelm.registry import Registry
    from ropelm.rope import RoPEOptions, RotaryEmbedding, apply_rotary_emb, build_rope_cache
    from ropelm.self_attention import KVCache, SelfAttention
    from ropelm.tables import PositionTables


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ropelm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AttentionLayer",
    "AttentionSpec",
    "Capabilities",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DecodeState",
    "KVCache",
    "ModelConfig",
    "PluginError",
    "PositionTables",
    "Registry",
    "ResolvedAttention",
    "RoPEOptions",
    "RopelmError",
    "RotaryEmbedding",
    "SelfAttention",
    "SoftmaxOptions",
    "TransformerLM",
    "UnknownAttentionError",
    "UnsupportedModelError",
    "apply_rotary_emb",
    "build_rope_cache",
    "hookimpl",
]
