"""Content-addressed cache directories: a stable key hash, and a lock while one is written.

The tokenizer (``{data.cache_dir}/tokenizer-{hash}``) and the token files
(``{data.cache_dir}/tokens-{hash}``) live in directories named by a hash of
everything that determines them; a later run with the same settings finds and
reuses them. Processes that build the same entry at the same time (every rank
under torchrun, two sweeps) take :func:`cache_lock` so that one builds while the
others wait and then reuse the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def content_hash(obj: Any, length: int = 16) -> str:
    """A short, stable hash of a JSON-serialisable object (for cache directory names)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache directory (created if needed) while writing it.

    A second process that wants to write the same cache entry waits here, then
    finds the finished result. The lock is ``DIRECTORY/.lock`` with
    ``fcntl.flock``, released when the process exits for whatever reason; where
    ``fcntl`` is missing, nothing is locked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(directory / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
