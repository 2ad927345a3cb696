"""The attention plugin contract and a reusable multi-head attention skeleton.

Notation used for tensor shapes in this module, the plugins and the model::

    B    batch size
    T    sequence length of the current forward pass (queries)
    L    key length (T, or the cached positions plus T when decoding)
    C    model width, n_embd
    V    vocabulary size
    nh   query heads, n_head
    nkv  key/value heads, n_kv_head (nh for plain multi-head attention)
    hs   head size, C // nh

A plugin registers an :class:`AttentionSpec`. The registry turns the spec and
the user's ``model.att_options`` into a :class:`ResolvedAttention` (options
parsed once, at the boundary), from which the model builds one
:class:`AttentionLayer` per block: a module mapping ``(B, T, C) -> (B, T, C)``.
Layers of variants that declare ``Capabilities(kv_cache=True)`` also implement
``init_cache(batch_size, max_len, device, dtype)`` and accept the returned
cache as ``forward(x, cache=cache)`` for incremental decoding.

Most variants only change how queries and keys carry position, or how scores
are turned into weights: subclass :class:`SelfAttention` and override
:meth:`SelfAttention.position_qk` or :meth:`SelfAttention.attend`. Variants that
only need grouped-query attention take :class:`KVHeadOptions` as their options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from ropelm.config import ModelConfig
from ropelm.errors import ConfigError, PluginError, UnsupportedShapeError, did_you_mean


class AttentionLayer(Protocol):
    """What the model needs from the module an :class:`AttentionSpec` factory builds.

    ``forward(x, cache=None)`` maps hidden states (B, T, C) to (B, T, C); with a
    cache it continues the sequence the cache holds. ``init_cache`` is needed
    only when the spec declares ``Capabilities(kv_cache=True)``; the cache it
    returns is any object with a ``length`` (positions consumed so far).
    """

    def __call__(self, x: torch.Tensor, cache: Any | None = None) -> torch.Tensor: ...

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an attention variant can do, so callers can skip what cannot work.

    Attributes:
        causal: position t never attends to positions after t (language modelling).
        kv_cache: the module implements ``init_cache`` and incremental decoding.
        extrapolates: designed to run on sequences longer than ``block_size``.
        input_position_embedding: the variant adds a position embedding at the
            model input (``AttentionSpec.position_embedding``).
    """

    causal: bool = True
    kv_cache: bool = True
    extrapolates: bool = False
    input_position_embedding: bool = False

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    def labels(self) -> list[str]:
        """Names of the capabilities that are switched on, for tables."""
        return [name for name, on in self.as_dict().items() if on]


# (config, options) -> nn.Module mapping (B, T, C) -> (B, T, C)
AttentionFactory = Callable[[ModelConfig, Any], nn.Module]
# (config, options) -> nn.Module mapping positions (T,) -> (T, C)
PositionEmbeddingFactory = Callable[[ModelConfig, Any], nn.Module]


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One registered attention variant.

    Attributes:
        name: the registry name, i.e. the value of ``model.att_type``.
        description: one line for ``ropelm-exp plugins``.
        reference: URL of the paper (or code) the variant implements.
        factory: ``factory(config, options)`` builds the attention module of one layer
            (an :class:`AttentionLayer`); ``options`` is always an instance of
            ``options`` (its defaults when the user gave none), or None when the
            variant takes no options.
        options: a dataclass type holding the variant's own options; users set them
            under ``model.att_options`` and they are validated against this type.
        capabilities: what the variant supports (see :class:`Capabilities`).
        position_embedding: optional ``factory(config, options)`` for a module that
            maps positions ``(T,)`` to embeddings ``(T, C)`` added to the token
            embeddings (absolute-position variants). The model casts them to the
            token embeddings' dtype, so a parameter-free embedding may return float32.
    """

    name: str
    description: str
    reference: str
    factory: AttentionFactory
    options: type | None = None
    capabilities: Capabilities = Capabilities()
    position_embedding: PositionEmbeddingFactory | None = None

    def __post_init__(self) -> None:
        problems = []
        if (
            not isinstance(self.name, str)
            or not self.name.strip()
            or self.name != self.name.strip()
        ):
            problems.append("name must be a non-empty string without surrounding spaces")
        if not isinstance(self.description, str):
            problems.append("description must be a string")
        if not isinstance(self.reference, str):
            problems.append("reference must be a string (a URL)")
        if not callable(self.factory):
            problems.append("factory must be callable as factory(config, options)")
        if self.options is not None and not (
            isinstance(self.options, type) and dataclasses.is_dataclass(self.options)
        ):
            problems.append("options must be a dataclass type or None")
        if not isinstance(self.capabilities, Capabilities):
            problems.append("capabilities must be a ropelm.Capabilities")
        elif self.capabilities.input_position_embedding != (self.position_embedding is not None):
            problems.append(
                "capabilities.input_position_embedding must be True exactly when "
                "position_embedding is given"
            )
        if self.position_embedding is not None and not callable(self.position_embedding):
            problems.append("position_embedding must be callable or None")
        if problems:
            raise ValueError("; ".join(problems))

    def parse_options(self, raw: Mapping[str, Any] | None) -> Any:
        """Validate ``model.att_options`` for this variant and return the options object.

        Raises:
            ConfigError: an unknown option (with the closest valid name) or a bad value.
        """
        raw = dict(raw or {})
        if self.options is None:
            if raw:
                raise ConfigError(
                    f"model.att_options: attention '{self.name}' takes no options, "
                    f"but got {sorted(raw)}; remove them."
                )
            return None
        valid = [f.name for f in dataclasses.fields(self.options)]
        for key in raw:
            if key not in valid:
                raise ConfigError(
                    f"model.att_options.{key}: unknown option for attention '{self.name}'"
                    f"{did_you_mean(key, valid)}; valid options are {valid}."
                )
        try:
            return pydantic.TypeAdapter(self.options).validate_python(raw)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            where = ".".join(["model.att_options", *(str(p) for p in first["loc"])])
            message = first["msg"].removeprefix("Value error, ").rstrip(".")
            # a check in the options' __post_init__ has no location and names its own value
            got = f", got {first.get('input')!r}" if first["loc"] else ""
            raise ConfigError(f"{where}: {message} (attention '{self.name}'{got}).") from None


@dataclasses.dataclass(frozen=True)
class ResolvedAttention:
    """An attention variant with its validated options: what :class:`TransformerLM` builds from.

    Made by :meth:`ropelm.Registry.resolve` (the one step that validates
    ``model.att_type`` and ``model.att_options``), so the model, the engine and
    the evaluation trust ``options`` without parsing them again.

    Attributes:
        spec: the registered variant.
        options: an instance of ``spec.options`` (None when the variant takes none).
        source: where the plugin came from (``builtin (...)``, a package, a module).
        version: the plugin's package version, when known.
    """

    spec: AttentionSpec
    options: Any
    source: str = "unregistered"
    version: str | None = None

    @classmethod
    def resolve(
        cls,
        spec: AttentionSpec,
        config: ModelConfig,
        *,
        source: str = "unregistered",
        version: str | None = None,
    ) -> ResolvedAttention:
        """Parse ``config.att_options`` with ``spec`` and check that it accepts the model shape.

        One layer (and the input position embedding, if any) is built on the meta
        device, so the variant's own checks (an even head size for RoPE, a divisor
        for ``n_kv_head``, ...) run without allocating memory.

        Raises:
            ConfigError: a bad option.
            UnsupportedShapeError: a model shape the variant rejects (a ConfigError too).
            PluginError: the factory built something that is not an attention layer.
        """
        if config.att_type != spec.name:
            raise ValueError(f"config.att_type is {config.att_type!r}, the spec is {spec.name!r}")
        resolved = cls(spec, spec.parse_options(config.att_options), source, version)
        try:
            with torch.device("meta"):
                layer = resolved.build_layer(config)
                resolved.build_position_embedding(config)
        except ConfigError as err:
            raise UnsupportedShapeError(str(err)) from None
        cache_missing = spec.capabilities.kv_cache and not callable(
            getattr(layer, "init_cache", None)
        )
        if not isinstance(layer, nn.Module) or cache_missing:
            needs = "an nn.Module" + (" with init_cache (kv_cache=True)" if cache_missing else "")
            raise PluginError(
                f"The factory of attention '{spec.name}' ({source}) returned "
                f"{type(layer).__name__}, not {needs}; see ropelm.attention.AttentionLayer."
            )
        return resolved

    @property
    def name(self) -> str:
        return self.spec.name

    def build_layer(self, config: ModelConfig) -> nn.Module:
        """The attention module of one block."""
        return self.spec.factory(config, self.options)

    def build_position_embedding(self, config: ModelConfig) -> nn.Module | None:
        """The input position embedding, for variants that declare one (else None)."""
        if self.spec.position_embedding is None:
            return None
        return self.spec.position_embedding(config, self.options)


@dataclasses.dataclass(frozen=True)
class KVHeadOptions:
    """``model.att_options`` of variants whose only option is grouped-query attention.

    Attributes:
        n_kv_head: key/value heads (None: n_head); must divide n_head. ``n_kv_head``
            < ``n_head`` is grouped-query attention (https://arxiv.org/abs/2305.13245),
            1 is multi-query attention (https://arxiv.org/abs/1911.02150). Changes the
            shape of ``c_attn``, so it must match the checkpoint.
    """

    n_kv_head: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise ValueError(f"n_kv_head must be >= 1 (or unset for n_head), got {self.n_kv_head}")


class KVCache:
    """Keys and values of one attention layer, preallocated for ``max_len`` positions.

    ``n_head`` is the number of key/value heads stored: ``n_kv_head`` under
    grouped-query attention.
    """

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, nh, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far; also the position of the next token

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, nh, T, hs); return all keys and values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot grow to {end}.")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(t_query: int, start: int, device: torch.device) -> torch.Tensor:
    """Boolean mask (T, start + T): query i (at position start + i) sees keys 0..start + i."""
    query_pos = torch.arange(start, start + t_query, device=device)[:, None]
    key_pos = torch.arange(start + t_query, device=device)[None, :]
    return key_pos <= query_pos


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: fused QKV projection, SDPA, output projection.

    Subclasses give it a position scheme by overriding :meth:`position_qk`, or a
    different score-to-weight rule by overriding :meth:`attend`. The base class
    itself has no position information (NoPE).

    ``n_kv_head`` < ``n_head`` gives grouped-query attention (Ainslie et al., 2023,
    https://arxiv.org/abs/2305.13245; ``n_kv_head=1`` is multi-query attention, Shazeer,
    2019, https://arxiv.org/abs/1911.02150): query head h reads key/value head
    ``h // (n_head // n_kv_head)``. The projection stays one fused ``c_attn`` whose
    rows are [q (n_head * hs), k (n_kv_head * hs), v (n_kv_head * hs)], so with
    ``n_kv_head == n_head`` the parameters and checkpoint layout are the plain MHA ones.
    """

    def __init__(self, config: ModelConfig, n_kv_head: int | None = None) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_head if n_kv_head is None else n_kv_head
        if self.n_kv_head < 1 or config.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.att_options.n_kv_head: must divide n_head ({config.n_head}), "
                f"got {self.n_kv_head}; use a divisor such as 1 (MQA) or {config.n_head} (MHA)."
            )
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        kv_dim = self.n_kv_head * self.head_size
        self.qkv_sizes = (config.n_embd, kv_dim, kv_dim)
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def gqa(self) -> bool:
        """True when keys and values have fewer heads than queries."""
        return self.n_kv_head != self.n_head

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, n_kv_head, T, hs) of x (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        return q, k, v

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """Merge heads of y (B, nh, T, hs) and project back to (B, T, C)."""
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Expand keys or values (B, n_kv_head, L, hs) to (B, nh, L, hs), for manual maths.

        SDPA does not need this: pass ``enable_gqa=self.gqa`` instead (no copy).
        """
        if not self.gqa:
            return x
        return x.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x)  # (B, nh, T, hs), (B, nkv, T, hs) x 2
        start = cache.length if cache is not None else 0
        q, k = self.position_qk(q, k, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, start + T, hs)
        y = self.attend(q, k, v, start)  # (B, nh, T, hs)
        return self.project_out(y)

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Give queries and keys (B, nh, T, hs) at positions start..start+T-1 their position."""
        return q, k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Causal softmax attention of q (B, nh, T, hs) over k, v (B, nkv, start + T, hs)."""
        dropout_p = self.dropout if self.training else 0.0
        t_query = q.size(2)
        if start == 0:
            mask, is_causal = None, True
        elif t_query == 1:  # one new token sees every cached key
            mask, is_causal = None, False
        else:
            mask, is_causal = causal_mask(t_query, start, q.device), False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=self.gqa
        )

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        return KVCache(batch_size, self.n_kv_head, max_len, self.head_size, device, dtype)
