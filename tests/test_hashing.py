"""Source hashing: streaming sha256 and the sqlite memo keyed by (path, size, mtime, inode)."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from recipe_runner.store import hashing
from recipe_runner.store.hashing import FileDigest, HashMemo, sha256_file

OLD = 1_600_000_000  # an mtime well outside the "racy" window, so hashes are memoized


def write(path: Path, data: bytes, mtime: int = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def counted(monkeypatch):
    """Counts the files the memo actually reads."""
    calls: list[str] = []
    real = hashing.sha256_file

    def counting(path, chunk=hashing.CHUNK):
        calls.append(str(path))
        return real(path, chunk)

    monkeypatch.setattr(hashing, "sha256_file", counting)
    return calls


def test_sha256_file_streams_in_chunks(tmp_path):
    data = os.urandom(100_000)
    path = write(tmp_path / "f.bin", data)
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()
    assert sha256_file(write(tmp_path / "empty", b"")) == hashlib.sha256(b"").hexdigest()


def test_memo_hit_does_not_read_the_file(tmp_path, counted):
    path = write(tmp_path / "model.safetensors", b"weights")
    memo = HashMemo(tmp_path / "state.sqlite3")
    first = memo.hash_file(path)
    # A new memo object (as in a later run) still knows the hash.
    again = HashMemo(tmp_path / "state.sqlite3").hash_file(path)
    assert first == again == hashlib.sha256(b"weights").hexdigest()
    assert counted == [str(path)]


def test_changed_mtime_or_size_rehashes(tmp_path, counted):
    memo = HashMemo(tmp_path / "state.sqlite3")
    path = write(tmp_path / "a.bin", b"one")
    memo.hash_file(path)
    write(path, b"two", mtime=OLD + 10)  # same size, new content and mtime
    assert memo.hash_file(path) == hashlib.sha256(b"two").hexdigest()
    write(path, b"three", mtime=OLD + 10)  # same mtime, new size
    assert memo.hash_file(path) == hashlib.sha256(b"three").hexdigest()
    assert len(counted) == 3


def test_replaced_file_same_size_and_mtime_rehashes_by_inode(tmp_path, counted):
    memo = HashMemo(tmp_path / "state.sqlite3")
    path = write(tmp_path / "a.bin", b"one")
    memo.hash_file(path)
    other = write(tmp_path / "new.bin", b"two")  # created while the old file lives: another inode
    os.replace(other, path)
    assert memo.hash_file(path) == hashlib.sha256(b"two").hexdigest()
    assert len(counted) == 2


def test_rehash_flag_forces_a_read(tmp_path, counted):
    memo = HashMemo(tmp_path / "state.sqlite3")
    path = write(tmp_path / "a.bin", b"data")
    memo.hash_file(path)
    memo.hash_file(path, rehash=True)
    assert len(counted) == 2


def test_fresh_file_is_hashed_but_not_remembered(tmp_path, counted):
    # Written just now: a same-size rewrite within the mtime tick could go unnoticed.
    memo = HashMemo(tmp_path / "state.sqlite3")
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"new")
    memo.hash_file(path)
    memo.hash_file(path)
    assert len(counted) == 2


def test_hash_files_names_by_relative_path(tmp_path):
    a = write(tmp_path / "m" / "a.bin", b"a")
    b = write(tmp_path / "m" / "sub" / "b.bin", b"bb")
    memo = HashMemo(tmp_path / "state.sqlite3")
    assert memo.hash_files([b, a], root=tmp_path / "m") == {
        "a.bin": FileDigest(1, hashlib.sha256(b"a").hexdigest()),
        "sub/b.bin": FileDigest(2, hashlib.sha256(b"bb").hexdigest()),
    }
    assert list(memo.hash_files([b, a])) == ["a.bin", "b.bin"]
    with pytest.raises(ValueError, match="two files named"):
        memo.hash_files([a, write(tmp_path / "other" / "a.bin", b"x")])


def test_unusable_database_falls_back_to_hashing(tmp_path, caplog):
    db = tmp_path / "state.sqlite3"
    db.write_bytes(b"this is not a sqlite database" * 100)
    path = write(tmp_path / "a.bin", b"data")
    assert HashMemo(db).hash_file(path) == hashlib.sha256(b"data").hexdigest()
    assert "unusable" in caplog.text


def _hash_all(db: str, paths: list[str], rounds: int, queue) -> None:
    memo = HashMemo(db)
    results = {}
    for _ in range(rounds):
        for p in paths:
            results[p] = memo.hash_file(p, rehash=True)  # rehash: every call writes to the memo
    queue.put(results)


def test_two_processes_hash_concurrently(tmp_path):
    paths = [str(write(tmp_path / f"f{i}.bin", f"file {i}".encode())) for i in range(40)]
    db = str(tmp_path / "state.sqlite3")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hash_all, args=(db, paths, 5, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}
    assert results == [expected, expected]
    rows = sqlite3.connect(db).execute("SELECT path, sha256 FROM file_hashes").fetchall()
    assert dict(rows) == {os.path.abspath(p): h for p, h in expected.items()}
