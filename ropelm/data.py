"""Token files: split the corpus, tokenize it, write flat token files, read batches from them.

Layout on disk (``{data.cache_dir}/tokens-{hash}/``, the hash covering the data
settings and the tokenizer's SHA-256)::

    train.bin   the training split, a flat array of token ids
    val.bin     the validation split, same layout
    meta.json   source, text column, tokenizer hash, dtype, counts, checksums;
                written last, so its presence marks a complete preparation

Each split's file is the concatenation, in source order, of every document of
that split as ``tokenizer.encode(text).ids`` followed by one end-of-text token
(``<|endoftext|>``): ``doc1 EOT doc2 EOT ... docN EOT``. Ids are little-endian
``uint16`` when the vocabulary has at most 65,536 tokens, else ``uint32``.
Documents go to a split by :meth:`ropelm.sources.DocumentSource.by_split` (a hash
of the split seed and the text), so the split does not depend on order or count.

Every file is written to a temporary name in the same directory, fsync'ed and
renamed into place; an old ``meta.json`` is removed before new token files
replace old ones, so a preparation killed at any moment never leaves a
directory that looks complete. Memory stays bounded whatever the corpus size:
documents are streamed and tokenized in batches of :data:`ENCODE_DOCS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ropelm.atomic import atomic_path, atomic_write_json, file_sha256
from ropelm.cache import cache_lock, content_hash
from ropelm.config import ExperimentConfig
from ropelm.errors import DataError
from ropelm.sources import PIECE_CHARS, SPLITS, DocumentSource, split_at_words
from ropelm.tokenfile import TokenFile
from ropelm.tokenizer import SPECIAL_TOKENS, TokenizerInfo, load_tokenizer

__all__ = [
    "DATA_FORMAT",
    "LAYOUT",
    "PreparedData",
    "TokenFile",
    "load_prepared",
    "prepare_data",
    "token_dtype",
    "tokens_dir",
]

log = logging.getLogger(__name__)

DATA_FORMAT = 1  # bump when the token-file layout changes, to invalidate caches
LAYOUT = (
    "each split: its documents in source order, each as tokenizer.encode(text).ids "
    "followed by one <|endoftext|> token; little-endian ids of the given dtype"
)
META_FILE = "meta.json"
ENCODE_DOCS = 1024  # documents per tokenizer call
ENCODE_CHARS = 4 << 20  # ... or fewer, once they hold this many characters
STALE_TEMP_S = 600  # a temp file untouched this long belongs to a dead preparation


@dataclass(frozen=True)
class PreparedData:
    """The token files of one experiment's data, ready for batches."""

    dir: Path
    train: TokenFile
    val: TokenFile
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits in 16 bits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokens_key(config: ExperimentConfig, tokenizer: TokenizerInfo) -> dict[str, Any]:
    """Everything that determines the token files (hashed into their directory name)."""
    d = config.data
    return {
        "format": DATA_FORMAT,
        "source": DocumentSource(d).fingerprint(),
        "split": {"val_fraction": d.val_fraction, "split_seed": d.split_seed},
        "tokenizer_sha256": tokenizer.sha256,
    }


def tokens_dir(config: ExperimentConfig, tokenizer: TokenizerInfo) -> Path:
    """Where the token files of ``config`` go: ``{cache_dir}/tokens-{hash}``."""
    return Path(config.data.cache_dir) / f"tokens-{content_hash(tokens_key(config, tokenizer))}"


class _SplitWriter:
    """Appends tokenized documents of one split to an open file, counting and hashing."""

    def __init__(self, file: Any, dtype: np.dtype, eot_id: int) -> None:
        self.file, self.dtype, self.eot_id = file, dtype, eot_id
        self.sha256 = hashlib.sha256()
        self.tokens = self.documents = 0

    def write(self, documents: Iterable[Iterable[list[int]]]) -> None:
        """Append documents, each given as pieces of token ids and followed by end-of-text;
        short documents are gathered into one write, a long one is written piece by piece."""
        flat: list[int] = []
        for pieces in documents:
            for ids in pieces:
                flat += ids
                if len(flat) >= 1 << 18:
                    self._append(flat)
                    flat = []
            flat.append(self.eot_id)
            self.documents += 1
        self._append(flat)

    def _append(self, ids: list[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype.newbyteorder("<"))
        self.file.write(array.data)
        self.sha256.update(array.data)
        self.tokens += len(ids)

    def summary(self, name: str) -> dict[str, Any]:
        return {
            "file": f"{name}.bin",
            "tokens": self.tokens,
            "documents": self.documents,
            "sha256": self.sha256.hexdigest(),
        }


def prepare_data(
    config: ExperimentConfig,
    tokenizer: TokenizerInfo,
    *,
    force: bool = False,
    progress: bool = True,
) -> PreparedData:
    """Split, tokenize and write the token files of ``config``, or reuse complete ones.

    Complete token files (``meta.json`` present) made with the same settings
    and tokenizer are reused after checking them; ``force`` rebuilds them.
    """
    out = tokens_dir(config, tokenizer)
    if (out / META_FILE).exists() and not force:
        log.info("Reusing token files in %s", out)
        return load_prepared(out, tokenizer)
    with cache_lock(out):  # another process preparing the same files: wait, then reuse
        if (out / META_FILE).exists() and not force:
            log.info("Reusing token files in %s", out)
            return load_prepared(out, tokenizer)
        _remove_stale_temps(out)
        return _prepare(config, tokenizer, out, progress=progress)


def _prepare(
    config: ExperimentConfig, tokenizer: TokenizerInfo, out: Path, *, progress: bool
) -> PreparedData:
    d = config.data
    tok = load_tokenizer(tokenizer.path)
    dtype = token_dtype(tokenizer.vocab_size)
    source = DocumentSource(d)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = {s: stack.enter_context(atomic_path(out / f"{s}.bin")) for s in SPLITS}
        files = {s: stack.enter_context(open(tmp[s], "wb")) for s in SPLITS}
        writers = {s: _SplitWriter(files[s], dtype, tokenizer.eot_id) for s in SPLITS}
        special = _tokenize(source, tok, writers, progress=progress)
        for f in files.values():
            f.close()
        _check_not_empty(writers, source)
        (out / META_FILE).unlink(missing_ok=True)  # the old files are no longer complete
    if special:
        log.warning(
            "%d documents contain a special token's text (e.g. %s); it is encoded as that token",
            special, SPECIAL_TOKENS[0],
        )  # fmt: skip
    columns = source.text_columns
    meta = {
        "format": DATA_FORMAT,
        "layout": LAYOUT,
        "source": source.describe(),
        "text_column": columns[0] if len(columns) == 1 else columns,
        "split": {"val_fraction": d.val_fraction, "split_seed": d.split_seed},
        "tokenizer": {
            "path": str(tokenizer.path),
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "pad_id": tokenizer.pad_id,
        },
        "dtype": dtype.name,
        "splits": {s: writers[s].summary(s) for s in SPLITS},
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(out / META_FILE, meta)  # last: marks the directory complete
    log.info(
        "Prepared %s: %d train tokens (%d documents), %d val tokens (%d documents)",
        out, writers["train"].tokens, writers["train"].documents,
        writers["val"].tokens, writers["val"].documents,
    )  # fmt: skip
    return load_prepared(out, tokenizer, verify=False)


def encode_documents(
    tok: Any, texts: list[str], piece_chars: int = PIECE_CHARS
) -> Iterator[Iterator[list[int]]]:
    """Each text's token ids, as an iterator of pieces: a text longer than ``piece_chars`` is
    encoded piece by piece (:func:`ropelm.sources.split_at_words`) and written as it goes, so
    memory stays bounded (a 50 MB one-line document once took 11 GB in one call); the ids are
    those of the whole text."""
    short = [text for text in texts if len(text) <= piece_chars]
    encoded = iter(tok.encode_batch_fast(short, add_special_tokens=False))
    for text in texts:
        if len(text) <= piece_chars:
            yield iter([next(encoded).ids])
        else:
            pieces = split_at_words(text, piece_chars)
            yield (tok.encode(piece, add_special_tokens=False).ids for piece in pieces)


def _tokenize(
    source: DocumentSource, tok: Any, writers: dict[str, _SplitWriter], *, progress: bool
) -> int:
    """Stream ``source`` into the split writers in batches; returns how many documents
    contain a special token's text."""
    d = source.data
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    read = special = 0

    def flush(split: str) -> None:
        writers[split].write(encode_documents(tok, pending[split]))
        pending[split], chars[split] = [], 0

    with tqdm(desc="prepare", unit=" docs", disable=not progress, total=d.max_documents) as bar:
        for split, text in source.by_split():
            read += 1
            pending[split].append(text)
            chars[split] += len(text)
            if "<|" in text and any(t in text for t in SPECIAL_TOKENS):
                special += 1
            if len(pending[split]) >= ENCODE_DOCS or chars[split] >= ENCODE_CHARS:
                flush(split)
                bar.update(read - bar.n)
                bar.set_postfix(tokens=writers["train"].tokens + writers["val"].tokens)
        for split in SPLITS:
            if pending[split]:
                flush(split)
        bar.update(read - bar.n)
    return special


def _check_not_empty(writers: dict[str, _SplitWriter], source: DocumentSource) -> None:
    train, val = writers["train"].documents, writers["val"].documents
    frac = source.data.val_fraction
    where = f"data.source {source.data.source}"
    if train + val == 0:
        raise DataError(
            f"The corpus from {where} is empty (no non-blank documents); add documents or "
            "check data.paths, data.text_column and data.max_documents."
        )
    if val == 0:
        raise DataError(
            f"The validation split is empty ({train} documents, data.val_fraction {frac}); "
            "raise data.val_fraction or add documents."
        )
    if train == 0:
        raise DataError(
            f"The training split is empty ({val} documents, data.val_fraction {frac}); "
            "lower data.val_fraction or add documents."
        )


def _remove_stale_temps(directory: Path) -> None:
    """Delete temp files of preparations that died (untouched for :data:`STALE_TEMP_S`)."""
    now = time.time()
    for name in (*(f"{s}.bin" for s in SPLITS), META_FILE):
        for path in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TEMP_S:
                    path.unlink()


def load_prepared(
    dir: str | Path, tokenizer: TokenizerInfo | None = None, *, verify: bool = True
) -> PreparedData:
    """Open complete token files, checking ``meta.json``, sizes and (``verify``) checksums.

    With ``tokenizer``, the files must have been made with it (same SHA-256).
    """
    dir = Path(dir)
    again = "rebuild them with `ropelm-exp prepare EXPERIMENT.yaml --force`"
    meta_path = dir / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{dir} holds no complete token files ({META_FILE} is missing, so preparation "
            "never finished); run `ropelm-exp prepare EXPERIMENT.yaml`."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        splits = {s: meta["splits"][s] for s in SPLITS}
        recorded = meta["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is unreadable or incomplete ({err}); {again}.") from None
    if meta.get("format") != DATA_FORMAT:
        raise DataError(
            f"Token files in {dir} have format {meta.get('format')}, this ropelm writes "
            f"format {DATA_FORMAT}; {again}."
        )
    if tokenizer is not None and recorded != tokenizer.sha256:
        raise DataError(
            f"Token files in {dir} were made with a different tokenizer (sha256 "
            f"{recorded[:12]}…, not {tokenizer.sha256[:12]}… of {tokenizer.path}); {again}."
        )
    files = {}
    for split, entry in splits.items():
        path = dir / entry["file"]
        expected = entry["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(
                f"Token file {path} is missing or has the wrong size (expected {expected} "
                f"bytes); {again}."
            )
        if verify and file_sha256(path) != entry["sha256"]:
            raise DataError(f"Token file {path} is damaged (checksum mismatch); {again}.")
        files[split] = TokenFile(path, dtype, name=split)
    return PreparedData(dir=dir, train=files["train"], val=files["val"], meta=meta)
