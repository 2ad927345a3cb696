"""How a command line names an attention variant: ``NAME[:KEY=VALUE[:KEY=VALUE...]]``.

One syntax serves ``sweep --variants``, ``bench --variants`` and the labels that
``compare`` prints and matches runs by, and one ``KEY=VALUE`` parser serves
those options and ``eval --att-option``. Values are read as YAML (numbers,
booleans, null), like ``--set``; the variant validates them later
(:meth:`ropelm.Registry.resolve`).

Examples::

    RoPE-SM                         # a variant with its default options
    RoPE-Sliding:window=32          # with one option
    RoPE-SM:scaling=yarn:scale_factor=4
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ropelm.config import parse_value
from ropelm.errors import ConfigError

__all__ = ["VariantChoice", "parse_att_options", "parse_key_value", "parse_variants"]


def parse_key_value(text: str, *, error: str) -> tuple[str, Any]:
    """``"scaling=yarn"`` -> ``("scaling", "yarn")``; the value is YAML.

    Raises:
        ConfigError: with the sentence ``error``, when ``text`` is not ``KEY=VALUE``.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(error)
    return key.strip(), parse_value(value)


def parse_att_options(items: Iterable[str]) -> dict[str, Any]:
    """``--att-option`` values: ``["scaling=yarn", "scale_factor=4"]`` -> a dict.

    A later key replaces an earlier one; the variant validates the values.
    """
    return dict(
        parse_key_value(
            item,
            error=f"--att-option '{item}': write it as KEY=VALUE, e.g. --att-option scaling=yarn.",
        )
        for item in items
    )


@dataclass(frozen=True, eq=False)
class VariantChoice:
    """An attention type and its options, as a command line names it.

    Two choices are equal when their names and options are, whatever the order
    the options were written in: that is how bench rows are matched to runs.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def _key(self) -> tuple[str, str]:
        return self.name, json.dumps(dict(self.options), sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VariantChoice) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @classmethod
    def of(cls, att_type: str, att_options: Mapping[str, Any] | None = None) -> VariantChoice:
        """The choice of a run or bench row (``att_type`` and ``att_options``)."""
        return cls(att_type, tuple((att_options or {}).items()))

    @classmethod
    def parse(cls, text: str) -> VariantChoice:
        """``"RoPE-Sliding:window=32"`` -> ``VariantChoice("RoPE-Sliding", (("window", 32),))``.

        Raises:
            ConfigError: an empty name or an option not written KEY=VALUE.
        """
        name, *raw_options = text.split(":")
        if not name.strip():
            raise ConfigError(f"--variants '{text}': the variant name is missing.")
        error = (
            f"--variants '{text}': write options as NAME:KEY=VALUE, e.g. 'RoPE-Sliding:window=32'."
        )
        options = tuple(parse_key_value(raw, error=error) for raw in raw_options)
        return cls(name.strip(), options)

    @property
    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        """``RoPE-Sliding:window=32`` (as written on the command line)."""
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.options)])

    @property
    def dir_label(self) -> str:
        """``RoPE-Sliding_window32``: the label made safe for a directory name."""
        parts = [self.name, *(f"{k}{v}" for k, v in self.options)]
        return "_".join(p.replace("/", "-").replace(" ", "") for p in parts)


def parse_variants(items: Iterable[str]) -> list[VariantChoice]:
    """``["RoPE-SM,ALiBi", "RoPE-Sliding:window=32"]`` -> three :class:`VariantChoice`.

    Raises:
        ConfigError: an empty list, an empty name, an option not written KEY=VALUE,
            or a variant named twice.
    """
    choices: list[VariantChoice] = []
    texts = [part.strip() for item in items for part in str(item).split(",")]
    for choice in map(VariantChoice.parse, filter(None, texts)):
        if choice in choices:
            raise ConfigError(f"--variants names '{choice.label}' twice; list it once.")
        choices.append(choice)
    if not choices:
        raise ConfigError("--variants is empty; name at least one attention variant.")
    return choices
