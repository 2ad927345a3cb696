"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Data goes to a temporary file in the target's directory, is flushed and
fsync'ed, and is then renamed over the target with ``os.replace`` (atomic on
POSIX and Windows). If anything fails, the temporary file is removed and the
target is untouched; a write the operating system refuses (full disk, file-size
limit, read-only directory) is a :class:`~ropelm.errors.StorageError` with one
sentence. JSON is written strictly: a non-finite float becomes ``null``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ropelm.errors import StorageError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``.

    The caller writes the complete file to the yielded path (by any means:
    numpy, safetensors, ...). The file is fsync'ed before the rename.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise storage_error(target, err) from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(target, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def storage_reason(err: BaseException) -> str:
    """Why the operating system refused a write, in a few words (the disk is full, ...)."""
    if isinstance(err, StorageError):
        return err.reason
    code = getattr(err, "errno", None)
    if code is None and "No space left" in str(err):  # safetensors' errors carry no errno
        code = errno.ENOSPC
    return {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "the file-size limit (ulimit -f) is reached",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission is denied",
        errno.EPERM: "permission is denied",
    }.get(
        code, getattr(err, "strerror", None) or str(err).splitlines()[0].removeprefix("[Errno 5] ")
    )


def storage_error(target: Path, err: BaseException) -> StorageError:
    """One sentence for a write the operating system refused."""
    if isinstance(err, StorageError):
        return err
    reason = storage_reason(err)
    return StorageError(
        f"Could not write {target}: {reason}; free space or choose a writable place and run "
        "again (nothing written before was changed).",
        reason=reason,
    )


def check_writable(target: str | Path) -> None:
    """Raise a StorageError now if ``target`` could not be written later (its directory, or
    the nearest one that exists, is not writable)."""
    directory = Path(target).parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise StorageError(f"Could not write {target}: {directory} is not a directory.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise storage_error(Path(target), PermissionError(errno.EACCES, "permission denied"))


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: strict(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(value) for value in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, obj: Any) -> None:
    atomic_write_text(target, json_text(obj) + "\n")


def fsync_file(path: str | Path) -> None:
    """Flush a file's contents to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
