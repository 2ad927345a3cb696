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
become weights: their factory returns a :class:`ropelm.SelfAttention` built
from parts (a rotation of q and k, a ``score_mod``, a ``mask_mod``, see
:mod:`ropelm.masks`), which runs on the fastest backend that can
(:mod:`ropelm.kernels`). A variant that is not a softmax over scores (linear
attention) returns its own module: the escape hatch. Softmax variants take
:class:`SoftmaxOptions` (grouped-query attention, logit soft-cap) or a subclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pydantic
import torch
from torch import nn

from ropelm.config import ModelConfig
from ropelm.errors import ConfigError, PluginError, UnsupportedModelError, did_you_mean


class AttentionLayer(Protocol):
    """What the model needs from the module an :class:`AttentionSpec` factory builds.

    ``forward(x, cache=None, document_ids=None)`` maps hidden states (B, T, C) to
    (B, T, C); with a cache it continues the sequence the cache holds; with
    ``document_ids`` (B, T) a query attends only to keys of its own document
    (asked for only when the spec declares ``Capabilities(document_mask=True)``).
    ``init_cache`` is needed only when the spec declares ``kv_cache=True``; the
    cache it returns is any object with a ``length`` (positions consumed so far).
    """

    def __call__(
        self, x: torch.Tensor, cache: Any | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor: ...

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
        document_mask: the module takes ``document_ids`` and keeps attention within
            documents (``train.document_mask``); :class:`ropelm.SelfAttention` does.
    """

    causal: bool = True
    kv_cache: bool = True
    extrapolates: bool = False
    input_position_embedding: bool = False
    document_mask: bool = False

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    def labels(self) -> list[str]:
        """Names of the capabilities that are switched on, for tables."""
        return [name for name, on in self.as_dict().items() if on]


# (config, options) -> nn.Module mapping (B, T, C) -> (B, T, C)
AttentionFactory = Callable[[ModelConfig, Any], nn.Module]
# (config, options) -> nn.Module mapping (start, length) to embeddings (length, C)
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
            maps ``(start, length)`` (Python ints: positions start..start+length-1,
            so no host sync) to embeddings ``(length, C)`` added to the token
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
            UnsupportedModelError: a model shape the variant rejects (a ConfigError too).
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
            raise UnsupportedModelError(str(err)) from None
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
class SoftmaxOptions:
    """``model.att_options`` every softmax-attention variant takes (subclass it to add yours).

    Attributes:
        n_kv_head: key/value heads (None: n_head); must divide n_head. ``n_kv_head``
            < ``n_head`` is grouped-query attention (https://arxiv.org/abs/2305.13245),
            1 is multi-query attention (https://arxiv.org/abs/1911.02150). Changes the
            shape of ``c_attn``, so it must match the checkpoint.
        softcap: cap c of the attention logits, c * tanh(score / c) (Gemma 2,
            https://arxiv.org/abs/2408.00118); None: no cap.
    """

    n_kv_head: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise ValueError(f"n_kv_head must be >= 1 (or unset for n_head), got {self.n_kv_head}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 (or unset for no cap), got {self.softcap}")
