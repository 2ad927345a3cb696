"""Atomic writes: readers see the old file or the complete new one, never a partial one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ropelm.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_atomic_path_replaces_the_target_on_success(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_write_helpers(tmp_path):
    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    atomic_write_text(tmp_path / "t", "héllo")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2], "b": "x"})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": "x"}
    atomic_write_json(tmp_path / "j.json", {"replaced": True})
    assert json.loads((tmp_path / "j.json").read_text()) == {"replaced": True}


SLOW_WRITER = """
import sys, time
from ropelm.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp, open(tmp, "wb") as f:
    for _ in range(1000):
        f.write(b"new" * 1000)
        f.flush()
        time.sleep(0.01)
"""


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)])
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in tmp_path.glob(".file.bin.*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert target.read_bytes() == b"old"


def test_written_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644
