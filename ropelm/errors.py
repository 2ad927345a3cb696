"""User-facing errors.

Every error a user can cause (bad YAML, unknown attention type, broken plugin,
corrupt checkpoint, ...) is a :class:`RopelmError` whose message is one sentence
saying what is wrong and how to fix it. The CLI prints that sentence instead of
a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RopelmError(Exception):
    """Base class of every error whose message is meant for the user."""


class ConfigError(RopelmError, ValueError):
    """An experiment or model configuration is invalid."""


class UnsupportedModelError(ConfigError):
    """The attention variant cannot build this model (RoPE with an odd head size, a
    backend that cannot run it, ...), although its options themselves are valid."""


class PluginError(RopelmError):
    """A plugin failed to import, registered a malformed spec or a duplicate name."""


class UnknownAttentionError(RopelmError, KeyError):
    """``att_type`` names no registered attention variant."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


class DataError(RopelmError):
    """A corpus, split or token file is empty, unreadable or inconsistent."""


class CheckpointError(RopelmError):
    """A checkpoint is missing, corrupt or does not match the model."""


class TrainingError(RopelmError):
    """Training cannot go on (a non-finite loss, ...); the message says what to do."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped training at a step boundary, after a resumable checkpoint."""


class StorageError(RopelmError, OSError):
    """A file could not be written (full disk, file-size limit, read-only directory).

    ``reason`` is the cause in a few words ("the disk is full"), for callers that word
    their own sentence around it.
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``word`` (case-insensitive), if any is close."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix, or ``""`` when nothing is close."""
    match = closest(word, candidates)
    return f" (did you mean '{match}'?)" if match else ""


def format_validation_error(err: object, root_model: type | None = None, prefix: str = "") -> str:
    """One sentence for the first problem of a pydantic ``ValidationError``.

    The sentence names the dotted path of the offending key; for an unknown key
    it suggests the closest valid key of ``root_model`` at that path.
    """
    first = err.errors()[0]  # type: ignore[attr-defined]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, RopelmError):  # a nested config already wrote its sentence
        return str(cause)
    loc = [str(part) for part in first["loc"]]
    path = ".".join(([prefix] if prefix else []) + loc) or (prefix or "config")
    if first["type"] == "extra_forbidden":
        valid = _fields_at(root_model, loc[:-1]) if root_model is not None else []
        return f"{path}: unknown key{did_you_mean(loc[-1], valid)}" + (
            f"; valid keys here are {', '.join(valid)}." if valid else "."
        )
    message = first["msg"].removeprefix("Value error, ").rstrip(".")
    if first["type"] == "missing":
        return f"{path}: required key is missing."
    shown = first.get("input")
    got = "" if isinstance(shown, dict) else f" (got {shown!r})"
    return f"{path}: {message}{got}."


def _fields_at(model: type, loc: list[str]) -> list[str]:
    """The field names of the pydantic model reached by following ``loc`` from ``model``."""
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if hasattr(c, "model_fields")), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))
