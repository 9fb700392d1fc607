"""Hash while writing: the streaming writer's sha256 is that of the bytes it wrote (tensors, reused staging
buffers, kernel-copied file ranges), it is recorded on the file, a record that no longer describes its file
is ignored, and a cache entry's manifest comes from the records without reading the files back."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from recipe_runner.io import safetensors_writer
from recipe_runner.io.safetensors_writer import FileRange, SafetensorsStreamWriter, TensorSpec, write_safetensors
from recipe_runner.io.written import XATTR, written_sha256
from recipe_runner.store import entry as entry_module
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.entry import hash_tree


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_kernel_copy(monkeypatch) -> None:
    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)


def staged_blocks(w: SafetensorsStreamWriter, payload: torch.Tensor, step: int):
    for r in range(0, payload.shape[0], step):
        out = w.staging(tuple(payload[r: r + step].shape), torch.float32)
        out.copy_(payload[r: r + step])
        yield out  # the buffer is reused once written: the bytes must still come out right


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_digest_is_that_of_the_bytes_written(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:
        no_kernel_copy(monkeypatch)
    rows = 300
    payload = torch.randn(rows, 50).to(torch.float16)
    src = tmp_path / "src.bin"
    src.write_bytes(b"junk" + payload.numpy().tobytes())
    specs = [TensorSpec("copied", torch.float16, (rows, 50)), TensorSpec("cast", torch.float32, (rows, 50)),
             TensorSpec("small", torch.int8, (3,))]
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, specs) as w:
        half = rows // 2 * 100
        w.write_blocks("cast", staged_blocks(w, payload, 7))
        w.write_blocks("copied", [FileRange(src, 4, half), payload[rows // 2: rows // 2 + 1],
                                  FileRange(src, 4 + half + 100, rows * 100 - half - 100)])
        w.write("small", torch.tensor([1, -2, 3], dtype=torch.int8))
    from safetensors.torch import load_file

    got = load_file(path)
    assert torch.equal(got["copied"], payload) and torch.equal(got["cast"], payload.float())
    assert w.sha256 == sha(path) and w.size == path.stat().st_size
    assert written_sha256(path, path.stat()) == w.sha256
    assert not path.with_name("x.safetensors.partial").exists()


def test_large_ranges_are_hashed_window_by_window(tmp_path, monkeypatch):
    from recipe_runner.io import sink

    monkeypatch.setattr(sink, "HASH_MAP_BYTES", 8192)  # many mapped windows, unaligned ends
    monkeypatch.setattr(safetensors_writer, "COPY_PIECE_BYTES", 30_001)  # and ranges copied in pieces
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_003))
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, [TensorSpec("t", torch.uint8, (99_000,))]) as w:
        w.write_blocks("t", [FileRange(src, 1_001, 50_000), FileRange(src, 51_001, 49_000)])
    assert w.sha256 == sha(path)


def test_a_record_is_trusted_only_for_the_file_it_was_made_for(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", {"t": torch.ones(4)})
    recorded = written_sha256(path, path.stat())
    assert recorded == sha(path)
    raw = json.loads(os.getxattr(path, XATTR))
    assert raw["sha256"] == recorded and raw["size"] == path.stat().st_size

    copy = tmp_path / "copy.safetensors"
    shutil.copy2(path, copy)  # copies the xattr and the mtime, but it is another inode
    assert written_sha256(copy, copy.stat()) is None

    moved = tmp_path / "moved.safetensors"
    os.rename(path, moved)  # a rename keeps the file: the record still holds
    assert written_sha256(moved, moved.stat()) == recorded

    with open(moved, "r+b") as f:  # changed after the record: mtime moves on
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    os.utime(moved, ns=(raw["mtime_ns"] + 5_000_000, raw["mtime_ns"] + 5_000_000))
    assert written_sha256(moved, moved.stat()) is None

    (tmp_path / "plain.json").write_text("{}")
    assert written_sha256(tmp_path / "plain.json", (tmp_path / "plain.json").stat()) is None
    os.setxattr(tmp_path / "plain.json", XATTR, b"not json")
    assert written_sha256(tmp_path / "plain.json", (tmp_path / "plain.json").stat()) is None


def test_write_errors_on_the_write_thread_reach_the_caller(tmp_path, monkeypatch):
    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_writer, "_write_all", full)
    path = tmp_path / "x.safetensors"
    with pytest.raises(OSError, match="No space left"):
        with SafetensorsStreamWriter(path, [TensorSpec("t", torch.float32, (1000, 10))]) as w:
            w.write_blocks("t", (torch.ones(10, 10) for _ in range(100)))
    assert list(tmp_path.iterdir()) == []


def test_cache_manifest_comes_from_the_records(tmp_path, monkeypatch):
    """Files the streaming writer wrote are not read back to be hashed; the others are; the manifest
    equals a re-hash of every file, and no record is left on the entry's files."""
    hashed: list[str] = []
    real = entry_module.sha256_file

    def counting(path, *a, **kw):
        hashed.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(entry_module, "sha256_file", counting)

    def produce(out: Path) -> None:
        (out / "sub").mkdir()
        write_safetensors(out / "a.safetensors", {"w": torch.randn(64, 64)})
        write_safetensors(out / "sub" / "b.safetensors", {"w": torch.randn(8).half()})
        (out / "config.json").write_text('{"x": 1}\n')
        unrecorded = write_safetensors(out / "c.safetensors", {"w": torch.zeros(3)})
        os.removexattr(unrecorded, XATTR)  # e.g. a file system without user xattrs

    store = CacheStore(tmp_path / "cache")
    entry = store.build("ab" * 32, "shard", produce)
    assert sorted(hashed) == ["c.safetensors", "config.json"]
    assert entry.files == hash_tree(entry.path)
    for name in entry.files:
        assert XATTR not in os.listxattr(entry.path / name)
    assert store.get("ab" * 32) is not None
    assert store.verify() == []
