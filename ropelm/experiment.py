"""An experiment ready to run: its validated configuration, its plugins and its attention.

Configuration is validated in two steps, each done once per command:

1. :func:`ropelm.config.load_experiment` checks the YAML against the schema
   (no torch, no plugins: enough to train a tokenizer or prepare data);
2. :meth:`Experiment.bind` loads the plugins into a :class:`ropelm.Registry` and
   resolves ``model.att_type`` with its ``model.att_options``
   (:meth:`ropelm.Registry.resolve`): an unknown variant or a bad option fails
   here, before any tokenizer or model work.

Commands pass the resulting :class:`Experiment` down; nothing below them builds
another registry or parses the options again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ropelm.attention import ResolvedAttention
from ropelm.config import ExperimentConfig, load_experiment
from ropelm.errors import ConfigError
from ropelm.registry import Registry


@dataclass(frozen=True)
class Experiment:
    """A validated experiment with its plugins loaded and its attention variant resolved."""

    config: ExperimentConfig
    registry: Registry
    attention: ResolvedAttention

    @classmethod
    def bind(cls, config: ExperimentConfig, registry: Registry | None = None) -> Experiment:
        """Resolve ``config``'s attention in ``registry`` (default: one built from its plugins).

        Raises:
            ropelm.PluginError: a plugin module fails to load.
            ropelm.UnknownAttentionError: ``model.att_type`` names no variant.
            ropelm.ConfigError: a bad ``model.att_options`` value, a shape or backend the variant
                cannot run, or ``train.document_mask`` for a variant without it.
        """
        if registry is None:
            registry = Registry.default(config.plugins)
        attention = registry.resolve(config.model)
        if config.train.document_mask and not attention.spec.capabilities.document_mask:
            raise ConfigError(
                f"train.document_mask: attention '{attention.name}' ({attention.source}) "
                "does not declare capabilities.document_mask; set train.document_mask: false "
                "or choose another variant."
            )
        return cls(config, registry, attention)

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = ()) -> Experiment:
        """Read, override and validate an experiment YAML, then bind it (steps 1 and 2)."""
        return cls.bind(load_experiment(path, overrides))

    def with_config(self, config: ExperimentConfig) -> Experiment:
        """Another configuration (a sweep's variant and seed) with the same plugins."""
        return Experiment.bind(config, self.registry)
