"""The byte-level BPE tokenizer: train it on the training split, cache it, load it.

The tokenizer is a GPT-2-style byte-level BPE built with Hugging Face
``tokenizers``: no normalizer, the ``ByteLevel`` pre-tokenizer (GPT-2 regex, no
prefix space) and decoder, all 256 bytes in the initial alphabet, and two
special tokens, ``<|endoftext|>`` (id 0, between documents) and ``<|pad|>``
(id 1, ``model.pad_token_id``). Encoding then decoding with
``skip_special_tokens=False`` gives any Unicode text back exactly; encoding adds
no special tokens of its own.

It is trained from a stream of the *training* split only (see
:func:`ropelm.sources.split_documents`), optionally capped by
``tokenizer.max_documents`` / ``tokenizer.max_characters``, with
``model.vocab_size`` tokens at most. The result is cached at
``{data.cache_dir}/tokenizer-{hash}/tokenizer.json``, where the hash covers
everything that determines it (source, split and tokenizer settings, the
vocabulary size and :data:`TOKENIZER_FORMAT`); a later call with the same
settings reuses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from ropelm.atomic import atomic_path, atomic_write_json, file_sha256
from ropelm.cache import cache_lock, content_hash
from ropelm.config import ExperimentConfig
from ropelm.errors import ConfigError, DataError
from ropelm.sources import PIECE_CHARS, DocumentSource, split_at_words, split_documents

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
BYTE_ALPHABET = 256
TOKENIZER_FORMAT = 1  # bump when the tokenizer recipe changes, to invalidate caches
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class TokenizerInfo:
    """A trained tokenizer on disk and the facts the rest of the pipeline needs."""

    path: Path  # .../tokenizer.json
    sha256: str  # hash of the tokenizer.json contents
    vocab_size: int  # tokenizer.get_vocab_size()
    eot_id: int  # end-of-text token id ("<|endoftext|>")
    pad_id: int  # padding token id ("<|pad|>")


def check_vocab_size(vocab_size: int) -> None:
    """Raise a ConfigError when ``vocab_size`` cannot hold the bytes and the special tokens."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"model.vocab_size ({vocab_size}) is smaller than the byte alphabet "
            f"({BYTE_ALPHABET}) plus {len(SPECIAL_TOKENS)} special tokens; "
            f"set model.vocab_size to at least {MIN_VOCAB_SIZE} (default 32768)."
        )


def tokenizer_key(config: ExperimentConfig) -> dict[str, Any]:
    """Everything that determines the trained tokenizer (hashed into its cache directory)."""
    d, t = config.data, config.tokenizer
    return {
        "format": TOKENIZER_FORMAT,
        "source": DocumentSource(d).fingerprint(),
        "split": {"val_fraction": d.val_fraction, "split_seed": d.split_seed},
        "tokenizer": {
            "min_frequency": t.min_frequency,
            "max_documents": t.max_documents,
            "max_characters": t.max_characters,
        },
        "vocab_size": config.model.vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
    }


def tokenizer_path(config: ExperimentConfig) -> Path:
    """Where the tokenizer of ``config`` is cached: ``{cache_dir}/tokenizer-{hash}/...``."""
    directory = Path(config.data.cache_dir) / f"tokenizer-{content_hash(tokenizer_key(config))}"
    return directory / TOKENIZER_FILE


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the ropelm recipe."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def training_batches(
    config: ExperimentConfig, stats: dict[str, int], *, progress: bool = True
) -> Iterator[list[str]]:
    """Batches of training-split documents, capped by the tokenizer settings.

    ``stats`` is updated in place with the ``documents`` and ``characters`` used.
    A document that crosses ``tokenizer.max_characters`` is cut to fit.
    """
    t = config.tokenizer
    stats.update(documents=0, characters=0)
    batch: list[str] = []
    bar = tqdm(desc="tokenizer: reading", unit=" docs", disable=not progress, total=t.max_documents)
    with bar:
        for text in split_documents(config.data, "train"):
            if t.max_characters is not None:
                text = text[: t.max_characters - stats["characters"]]
            if len(text) > PIECE_CHARS:  # bounded memory: a huge document goes in pieces
                yield from ([piece] for piece in split_at_words(text, PIECE_CHARS))
            else:
                batch.append(text)
            stats["documents"] += 1
            stats["characters"] += len(text)
            bar.update()
            full = t.max_characters is not None and stats["characters"] >= t.max_characters
            if full or (t.max_documents is not None and stats["documents"] >= t.max_documents):
                break
            if len(batch) >= t.batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def train_tokenizer(
    config: ExperimentConfig, *, force: bool = False, progress: bool = True
) -> TokenizerInfo:
    """Train the tokenizer of ``config`` on its training split, or reuse the cached one.

    ``force`` retrains even when a cached tokenizer exists. The file is written
    atomically, so an interrupted training leaves nothing that looks complete.
    """
    check_vocab_size(config.model.vocab_size)
    path = tokenizer_path(config)
    if path.exists() and not force:
        log.info("Reusing tokenizer %s", path)
        return tokenizer_info(path)
    with cache_lock(path.parent):  # another process training the same one: wait, reuse
        if path.exists() and not force:
            log.info("Reusing tokenizer %s", path)
            return tokenizer_info(path)
        return _train(config, path, progress=progress)


def _train(config: ExperimentConfig, path: Path, *, progress: bool) -> TokenizerInfo:
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.model.vocab_size,
        min_frequency=config.tokenizer.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats: dict[str, int] = {}
    failure: list[BaseException] = []

    def batches() -> Iterator[list[str]]:
        try:
            yield from training_batches(config, stats, progress=progress)
        except BaseException as err:  # re-raised below with its own type and message
            failure.append(err)
            raise

    start = time.perf_counter()
    try:
        tokenizer.train_from_iterator(batches(), trainer)
    except Exception:
        if failure:
            raise failure[0] from None
        raise
    if stats.get("documents", 0) == 0:
        raise DataError(
            f"The training split of {config.data.source} is empty (no documents); "
            "add documents or check data.paths, data.text_column and data.max_documents."
        )
    seconds = time.perf_counter() - start
    if tokenizer.get_vocab_size() < config.model.vocab_size:
        log.warning(
            "The corpus only supports %d of the %d requested tokens (too little text or "
            "tokenizer.min_frequency too high)",
            tokenizer.get_vocab_size(),
            config.model.vocab_size,
        )
    atomic_write_json(
        path.with_name("training.json"),
        {"key": tokenizer_key(config), **stats, "seconds": round(seconds, 3)},
    )
    with atomic_path(path) as tmp:  # written last: tokenizer.json marks completion
        tokenizer.save(str(tmp))
    info = tokenizer_info(path)
    log.info(
        "Trained tokenizer on %d documents (%d characters) in %.1f s: %d tokens -> %s",
        stats["documents"], stats["characters"], seconds, info.vocab_size, path,
    )  # fmt: skip
    return info


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; a missing or corrupt file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Tokenizer file {path} does not exist; run `ropelm-exp tokenizer EXPERIMENT.yaml`."
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise DataError(
            f"Tokenizer file {path} is not a valid tokenizer.json ({err}); delete it and "
            "run `ropelm-exp tokenizer EXPERIMENT.yaml --force`."
        ) from None


def tokenizer_info(path: str | Path) -> TokenizerInfo:
    """Load ``path`` and describe it: its hash, vocabulary size and special token ids."""
    path = Path(path)
    tokenizer = load_tokenizer(path)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise DataError(
            f"Tokenizer {path} has no {' or '.join(missing)} token, so it was not made by "
            "ropelm; run `ropelm-exp tokenizer EXPERIMENT.yaml --force`."
        )
    return TokenizerInfo(
        path=path,
        sha256=file_sha256(path),
        vocab_size=tokenizer.get_vocab_size(),
        eot_id=ids[EOT],
        pad_id=ids[PAD],
    )
