"""Preparation: the split, the token-file layout, meta.json, caching, atomicity, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from ropelm.cli import main
from ropelm.config import validate
from ropelm.data import load_prepared, prepare_data, token_dtype, tokens_dir
from ropelm.errors import DataError
from ropelm.sources import split_documents, split_of
from ropelm.tokenizer import train_tokenizer


def experiment(cache: Path, vocab_size: int = 500, **data):
    return validate({
        "model": {"vocab_size": vocab_size, "n_embd": 64, "n_head": 4, "block_size": 32},
        "tokenizer": {"max_documents": 300},
        "data": {"cache_dir": str(cache), "max_documents": 400, **data},
    })  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = experiment(tmp_path_factory.mktemp("cache"))
    info = train_tokenizer(config, progress=False)
    return config, info, prepare_data(config, info, progress=False)


def test_token_files_match_an_independent_tokenization(prepared):
    """Each split: its documents in source order, each encoded and followed by one EOT."""
    config, _, data = prepared
    tok = Tokenizer.from_file(data.meta["tokenizer"]["path"])
    eot = tok.token_to_id("<|endoftext|>")
    for split, token_file in (("train", data.train), ("val", data.val)):
        expected = []
        for text in split_documents(config.data, split):
            expected += [*tok.encode(text).ids, eot]
        stored = np.fromfile(token_file.path, dtype="<u2")
        assert stored.tolist() == expected
        assert data.meta["splits"][split]["documents"] == int((stored == eot).sum())


def test_meta_records_source_tokenizer_dtype_counts_and_checksums(prepared):
    config, info, data = prepared
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta == data.meta
    assert data.dir == tokens_dir(config, info) and data.dir.name.startswith("tokens-")
    assert meta["source"]["source"] == "wiki-sample" and meta["text_column"] == "extract"
    assert meta["tokenizer"]["sha256"] == info.sha256
    assert (meta["tokenizer"]["eot_id"], meta["tokenizer"]["pad_id"]) == (info.eot_id, info.pad_id)
    assert meta["dtype"] == "uint16" and data.train.dtype == np.dtype("uint16")
    for split, token_file in (("train", data.train), ("val", data.val)):
        entry = meta["splits"][split]
        assert entry["tokens"] == len(token_file) == token_file.path.stat().st_size // 2
        assert entry["sha256"] == sha256(token_file.path)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 400
    assert sorted(os.listdir(data.dir)) == [".lock", "meta.json", "train.bin", "val.bin"]


def test_split_ratio_disjoint_and_deterministic(prepared, tmp_path):
    config, info, data = prepared
    n_val = data.meta["splits"]["val"]["documents"]
    assert 0.05 < n_val / 400 < 0.15
    train, val = (
        set(split_documents(config.data, "train")),
        set(split_documents(config.data, "val")),
    )
    assert not train & val
    again = prepare_data(experiment(tmp_path), info, progress=False)  # a second, separate run
    for split in ("train", "val"):
        assert sha256(again.dir / f"{split}.bin") == sha256(data.dir / f"{split}.bin")


def test_split_is_stable_when_the_stream_is_cut_short(prepared):
    config, _, _ = prepared
    short = experiment(Path(config.data.cache_dir), max_documents=150)
    val_short = list(split_documents(short.data, "val"))
    val_long = list(split_documents(config.data, "val"))
    assert val_short and val_long[: len(val_short)] == val_short


def test_reuse_force_and_incomplete_directories(prepared):
    config, info, data = prepared
    stamps = {p.name: p.stat().st_mtime_ns for p in data.dir.iterdir()}
    assert prepare_data(config, info, progress=False).meta == data.meta
    assert {p.name: p.stat().st_mtime_ns for p in data.dir.iterdir()} == stamps
    digest = sha256(data.train.path)
    rebuilt = prepare_data(config, info, force=True, progress=False)
    assert rebuilt.train.path.stat().st_mtime_ns != stamps["train.bin"]
    assert sha256(rebuilt.train.path) == digest
    (data.dir / "meta.json").unlink()  # as if killed before the completion marker
    with pytest.raises(DataError, match="never finished"):
        load_prepared(data.dir)
    assert prepare_data(config, info, progress=False).meta["splits"] == data.meta["splits"]


def test_concurrent_preparations_of_the_same_data(prepared, tmp_path):
    """Like every rank under torchrun: all succeed, none replaces a finished file."""
    _, info, data = prepared
    config = experiment(tmp_path)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: prepare_data(config, info, progress=False), range(3)))
    for result in results:
        assert result.dir == results[0].dir
        assert result.meta["splits"] == data.meta["splits"]
    assert load_prepared(results[0].dir, info).meta == results[-1].meta
    assert sorted(os.listdir(results[0].dir)) == [".lock", "meta.json", "train.bin", "val.bin"]


def test_token_files_of_another_tokenizer_are_refused(prepared, tmp_path):
    _, info, data = prepared
    other = train_tokenizer(experiment(tmp_path, vocab_size=450), progress=False)
    assert other.sha256 != info.sha256
    with pytest.raises(DataError, match=r"different tokenizer .*--force"):
        load_prepared(data.dir, other)
    assert load_prepared(data.dir, info).meta["splits"] == data.meta["splits"]  # untouched


def test_damaged_token_files_are_detected(prepared, tmp_path):
    _, info, data = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (copy / name).write_bytes((data.dir / name).read_bytes())
    raw = bytearray((copy / "val.bin").read_bytes())
    raw[10] ^= 0xFF
    (copy / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"val\.bin is damaged \(checksum mismatch\)"):
        load_prepared(copy, info)
    (copy / "val.bin").write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match="wrong size"):
        load_prepared(copy, info)


def test_empty_split_and_empty_corpus_write_nothing(prepared, tmp_path):
    _, info, _ = prepared
    texts = [f"document {i}" for i in range(40)]
    train_only = [t for t in texts if split_of(t, 0, 0.1) == "train"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(train_only) + "\n", encoding="utf-8")
    config = experiment(tmp_path / "c1", source="files", paths=[str(corpus)])
    with pytest.raises(DataError, match=r"validation split is empty .*raise data\.val_fraction"):
        prepare_data(config, info, progress=False)
    assert not [p for p in (tmp_path / "c1").rglob("*") if p.is_file() and p.name != ".lock"]
    (tmp_path / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    config = experiment(tmp_path / "c2", source="files", paths=[str(tmp_path / "blank.txt")])
    with pytest.raises(DataError, match=r"corpus .* is empty"):
        prepare_data(config, info, progress=False)


def test_a_failure_midway_leaves_complete_files_untouched(prepared, tmp_path):
    _, info, _ = prepared
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("".join(f"line {i} of good text\n" for i in range(200)), encoding="utf-8")
    bad.write_text("fine for now\n", encoding="utf-8")
    config = experiment(tmp_path / "cache", source="files", paths=[str(good), str(bad)])
    first = prepare_data(config, info, progress=False)
    before = {p.name: p.read_bytes() for p in first.dir.iterdir()}
    stat = bad.stat()
    bad.write_bytes(b"\xc3\x28 broken!!!\n")  # same size and time: same cache directory
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tokens_dir(config, info) == first.dir
    with pytest.raises(DataError, match=r"bad\.txt"):
        prepare_data(config, info, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in first.dir.iterdir()} == before


KILLED_PREP = """
import json, sys
from ropelm.config import validate
from ropelm.data import prepare_data
from ropelm.tokenizer import tokenizer_info
prepare_data(validate(json.loads(sys.argv[1])), tokenizer_info(sys.argv[2]), force=True,
             progress=False)
"""


def test_a_killed_rebuild_never_looks_complete(prepared, tmp_path):
    """SIGKILL a --force rebuild mid-way: the old files stay valid, or look unfinished."""
    _, info, _ = prepared
    config = experiment(tmp_path, max_documents=None)  # the whole sample: ~1 s to tokenize
    data = prepare_data(config, info, progress=False)
    script = tmp_path / "prep.py"
    script.write_text(KILLED_PREP)
    args = [sys.executable, str(script), json.dumps(config.model_dump(mode="json")), str(info.path)]
    for delay in (0.0, 0.3):
        proc = subprocess.Popen(args)
        deadline = time.monotonic() + 120
        while not list(data.dir.glob(".*.tmp")):
            assert proc.poll() is None, "the preparation ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        try:
            assert load_prepared(data.dir, info).meta["splits"] == data.meta["splits"]
        except DataError as err:
            assert "never finished" in str(err)
    assert list(data.dir.glob(".*.tmp"))  # what the killed runs left: hidden temp files
    assert prepare_data(config, info, progress=False).meta["splits"] == data.meta["splits"]


def test_dtype_follows_the_vocabulary():
    assert token_dtype(500) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_progress_bar_while_preparing(prepared, capsys):
    config, info, _ = prepared
    prepare_data(config, info, force=True, progress=True)
    assert "prepare" in capsys.readouterr().err


def test_cli_tokenizer_and_prepare(prepared, tmp_path):
    (tmp_path / "x.yaml").write_text(
        "model: {vocab_size: 300, n_embd: 64, n_head: 4}\n"
        f"data: {{cache_dir: '{tmp_path / 'cache'}', max_documents: 200}}\n"
    )
    runner = CliRunner()
    result = runner.invoke(main, ["tokenizer", str(tmp_path / "x.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "tokenizer-" in result.output and "300 tokens" in result.output
    result = runner.invoke(main, ["prepare", str(tmp_path / "x.yaml"), "--quiet", "--force"])
    assert result.exit_code == 0, result.output
    assert "token files:" in result.output and "train:" in result.output
    bad = runner.invoke(
        main, ["prepare", str(tmp_path / "x.yaml"), "--set", "model.vocab_size=100"]
    )
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1].startswith("Error: model.vocab_size (100)")
    assert "--force" in runner.invoke(main, ["prepare", "--help"]).output


def test_a_long_document_is_encoded_in_pieces_with_the_same_ids(prepared):
    """Bounded memory for huge one-line documents: pieces cut at word starts give exactly the
    ids of the whole text (byte-level BPE never merges across a pre-token boundary)."""
    from ropelm.data import encode_documents
    from ropelm.sources import split_at_words

    _, _, data = prepared
    tok = Tokenizer.from_file(data.meta["tokenizer"]["path"])
    rng = np.random.default_rng(0)
    words = ["the", "history", "of", "Zürich", "1987", "—", "東京", "x\n", "a  b", "   ", "!!"]
    text = "".join(rng.choice(words) + rng.choice([" ", "  ", "", "\n "]) for _ in range(3000))
    pieces = split_at_words(text, 200)
    assert "".join(pieces) == text and len(pieces) > 20
    assert all(len(piece) <= 200 for piece in pieces)
    whole = tok.encode(text, add_special_tokens=False).ids
    documents = [
        [i for ids in pieces for i in ids] for pieces in encode_documents(tok, ["one", text], 200)
    ]
    assert documents == [tok.encode("one", add_special_tokens=False).ids, whole]
