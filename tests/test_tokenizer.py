"""Tokenizer training, caching, exact round trips and the errors a user can cause."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from ropelm.config import validate
from ropelm.errors import ConfigError, DataError
from ropelm.sources import split_of
from ropelm.tokenizer import (
    EOT,
    PAD,
    file_sha256,
    load_tokenizer,
    tokenizer_info,
    tokenizer_path,
    train_tokenizer,
)


def experiment(cache: Path, vocab_size: int = 400, **sections):
    raw = {"model": {"vocab_size": vocab_size, "n_embd": 64, "n_head": 4}}
    raw["data"] = {"cache_dir": str(cache), **sections.pop("data", {})}
    raw["tokenizer"] = sections.pop("tokenizer", {"max_documents": 300})
    return validate(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = experiment(tmp_path_factory.mktemp("cache"))
    return config, train_tokenizer(config, progress=False)


ROUND_TRIP = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows\nnewlines\n\n",
    "naïve café, Straße, Ελληνικά, русский, עברית, العربية",
    "中文字符和日本語のテキスト, 한국어",
    "emoji 🎉👩‍👩‍👧‍👦 and flags 🇩🇪",
    "combining e\u0301 vs é, zero\u200bwidth, bom \ufeff",
    "control \x00\x01\x7f characters",
    "specials in text: <|endoftext|> and <|pad|> stay",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP \U0010fffd",
]


def test_info_describes_the_saved_tokenizer(trained):
    config, info = trained
    assert info.path == tokenizer_path(config) and info.path.name == "tokenizer.json"
    assert info.path.parent.name.startswith("tokenizer-")
    assert info.path.parent.parent == Path(config.data.cache_dir)
    assert info.vocab_size == 400
    assert info.sha256 == file_sha256(info.path)
    tok = Tokenizer.from_file(str(info.path))
    assert (tok.token_to_id(EOT), tok.token_to_id(PAD)) == (info.eot_id, info.pad_id)
    assert info == tokenizer_info(info.path)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_encode_then_decode_gives_the_text_back(trained, text):
    tok = load_tokenizer(trained[1].path)
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < trained[1].vocab_size for i in ids)


def test_encoding_adds_no_special_tokens(trained):
    tok = load_tokenizer(trained[1].path)
    assert trained[1].eot_id not in tok.encode("plain words").ids


def test_reused_unless_forced_and_training_is_deterministic(trained):
    config, info = trained
    stamp = info.path.stat().st_mtime_ns
    assert train_tokenizer(config, progress=False) == info
    assert info.path.stat().st_mtime_ns == stamp  # not rewritten
    again = train_tokenizer(config, force=True, progress=False)
    assert again.sha256 == info.sha256
    assert info.path.stat().st_mtime_ns != stamp


def test_cache_key_follows_the_settings_that_shape_it(tmp_path):
    base = tokenizer_path(experiment(tmp_path))
    assert tokenizer_path(experiment(tmp_path, vocab_size=512)) != base
    assert tokenizer_path(experiment(tmp_path, tokenizer={"max_documents": 10})) != base
    assert tokenizer_path(experiment(tmp_path, data={"split_seed": 3})) != base
    assert tokenizer_path(experiment(tmp_path, data={"max_documents": 50})) != base
    same = experiment(tmp_path, tokenizer={"max_documents": 300, "batch_size": 7})
    assert tokenizer_path(same) == base  # the batch size does not change the result


def test_trained_on_the_training_split_only(tmp_path):
    """A word repeated all over the validation documents must not become a token."""
    normal = [f"ordinary text about topic {i} with common words" for i in range(200)]
    marked = [f"zyzzyva zyzzyva zyzzyva zyzzyva document {i}" for i in range(400)]
    val_marked = [t for t in marked if split_of(t, 0, 0.1) == "val"]
    assert len(val_marked) > 10
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(normal + val_marked) + "\n", encoding="utf-8")
    config = experiment(tmp_path / "cache", data={"source": "files", "paths": [str(corpus)]})
    tok = load_tokenizer(train_tokenizer(config, progress=False).path)
    assert not any("zy" in token for token in tok.get_vocab())
    assert any("ordinary" in token for token in tok.get_vocab())


def test_document_and_character_caps(tmp_path):
    config = experiment(tmp_path, tokenizer={"max_characters": 5000})
    info = train_tokenizer(config, progress=False)
    stats = json.loads((info.path.parent / "training.json").read_text())
    assert stats["characters"] == 5000
    config = experiment(tmp_path, tokenizer={"max_documents": 7})
    stats = json.loads((train_tokenizer(config, progress=False).path.parent / "training.json")
                       .read_text())  # fmt: skip
    assert stats["documents"] == 7


def test_vocab_smaller_than_bytes_plus_specials(tmp_path):
    with pytest.raises(ConfigError, match=r"vocab_size \(257\).*byte alphabet \(256\).*258"):
        train_tokenizer(experiment(tmp_path, vocab_size=257), progress=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    info = train_tokenizer(experiment(tmp_path, vocab_size=258), progress=False)
    assert info.vocab_size == 258


def test_empty_training_split_writes_nothing(tmp_path):
    only_val = next(f"doc {i}" for i in range(1000) if split_of(f"doc {i}", 0, 0.1) == "val")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(only_val + "\n\n   \n", encoding="utf-8")
    config = experiment(tmp_path / "cache", data={"source": "files", "paths": [str(corpus)]})
    with pytest.raises(DataError, match=r"training split .* is empty"):
        train_tokenizer(config, progress=False)
    assert not tokenizer_path(config).exists()


def test_a_bad_file_midway_leaves_no_tokenizer_behind(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("some text\n" * 50, encoding="utf-8")
    bad.write_bytes(b"\xff\xfe\xfa not utf-8\n")
    config = experiment(tmp_path / "cache", data={"source": "files",
                                                  "paths": [str(good), str(bad)]})  # fmt: skip
    with pytest.raises(DataError, match=r"bad\.txt"):
        train_tokenizer(config, progress=False)
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert not [p for p in leftovers if p.is_file() and p.name != ".lock"]


def test_missing_corrupt_and_foreign_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="does not exist; run `ropelm-exp tokenizer"):
        load_tokenizer(tmp_path / "tokenizer.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match=r"corrupt\.json is not a valid tokenizer\.json"):
        tokenizer_info(corrupt)
    foreign = tmp_path / "foreign.json"
    Tokenizer(models.BPE()).save(str(foreign))
    with pytest.raises(DataError, match=re.escape("has no <|endoftext|> or <|pad|> token")):
        tokenizer_info(foreign)


def test_concurrent_training_of_the_same_tokenizer(tmp_path):
    """Like every rank under torchrun: one trains, the others wait and reuse it."""
    config = experiment(tmp_path, tokenizer={"max_documents": 100})
    with ThreadPoolExecutor(3) as pool:
        infos = list(pool.map(lambda _: train_tokenizer(config, progress=False), range(3)))
    assert infos[0] == infos[1] == infos[2] == tokenizer_info(tokenizer_path(config))


def test_progress_bar_while_training(tmp_path, capsys):
    train_tokenizer(experiment(tmp_path, tokenizer={"max_documents": 20}), progress=True)
    assert "tokenizer" in capsys.readouterr().err


def test_no_temporary_files_beside_the_tokenizer(trained):
    """No temporary files remain next to the saved tokenizer."""
    names = os.listdir(trained[1].path.parent)
    assert sorted(names) == [".lock", "tokenizer.json", "training.json"]
