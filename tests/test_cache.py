"""The content-addressed store: atomic entries, one builder per key, quarantine, gc."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from recipe_runner.store.cache import CacheStore, default_cache_root
from recipe_runner.store.gc import parse_size
from recipe_runner.errors import UserError
from recipe_runner.store.fsutil import fingerprints


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def gc_keys(store: CacheStore, **kwargs) -> list[str]:
    return [info.key for info in store.gc(**kwargs)]


def writer(files: dict[str, bytes]):
    def produce(out: Path) -> None:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
    return produce


@pytest.fixture
def warnings_seen() -> list[str]:
    return []


@pytest.fixture
def store(tmp_path, warnings_seen) -> CacheStore:
    return CacheStore(tmp_path / "cache", warn=warnings_seen.append)


def set_last_used(store: CacheStore, k: str, when: float) -> None:
    info_path = store.entry_dir(k) / "info.json"
    info = json.loads(info_path.read_text())
    info["last_used"] = when
    info_path.write_text(json.dumps(info))


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RECIPE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.delenv("RECIPE_CACHE_DIR")
    assert default_cache_root() == Path.home() / ".cache" / "recipe-runner"


def test_build_then_get(store):
    k = key("convert")
    entry = store.build(k, "convert", writer({"b.bin": b"bb", "sub/a.json": b"{}"}), recipe="tiny")
    assert entry.path == store.root / "entries" / k[:2] / k / "data"
    assert (entry.path / "sub" / "a.json").read_bytes() == b"{}"
    assert entry.files == {"b.bin": {"size": 2, "sha256": hashlib.sha256(b"bb").hexdigest()},
                           "sub/a.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
    manifest_text = (entry.path.parent / "manifest.json").read_text()
    assert json.loads(manifest_text) == {"key": k, "stage": "convert", "files": entry.files}
    assert manifest_text == json.dumps(json.loads(manifest_text), sort_keys=True, indent=2) + "\n"
    assert "recipes" not in manifest_text and "created" not in manifest_text  # bookkeeping lives in info.json
    assert not os.stat(entry.path / "b.bin").st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert store.get(k) == entry and k in store
    assert store.get(key("other")) is None
    assert list((store.root / "tmp").iterdir()) == []


def test_build_of_an_existing_entry_does_not_produce(store):
    k = key("x")
    store.build(k, "convert", writer({"a": b"1"}))
    again = store.build(k, "convert", lambda out: pytest.fail("produce ran for a cached key"), recipe="r2")
    assert again.files["a"]["size"] == 1
    assert store.ls()[0].recipes == ("r2",)


def test_failing_produce_leaves_nothing(store):
    def produce(out: Path) -> None:
        (out / "partial.bin").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        store.build(key("x"), "convert", produce)
    assert store.get(key("x")) is None
    assert list((store.root / "tmp").iterdir()) == []
    assert not (store.root / "entries").exists() or not any((store.root / "entries").rglob("*"))


def test_symlinks_cannot_be_cached(store, tmp_path):
    def produce(out: Path) -> None:
        (out / "link").symlink_to(tmp_path)

    with pytest.raises(ValueError, match="only regular files"):
        store.build(key("x"), "convert", produce)
    assert store.get(key("x")) is None


def test_keys_must_be_hex_digests(store):
    for bad in ("../etc", "ABC", "", "deadbeef/../x"):
        with pytest.raises(ValueError, match="hex digest"):
            store.get(bad)


def _build_counting(root: str, k: str, counter: str, queue) -> None:
    def produce(out: Path) -> None:
        with open(counter, "a") as f:
            f.write("ran\n")
        time.sleep(0.3)  # long enough that the other process is waiting on the lock
        (out / "rank0.safetensors").write_bytes(b"tensor bytes")

    entry = CacheStore(root).build(k, "shard", produce)
    queue.put((entry.key, str(entry.path), entry.files))


def test_concurrent_builds_of_one_key_produce_once(store, tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    counter = tmp_path / "counter"
    procs = [ctx.Process(target=_build_counting, args=(str(store.root), key("k"), str(counter), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert counter.read_text() == "ran\n"
    assert results[0] == results[1]
    assert store.get(key("k")).files == results[0][2]


def _build_then_hang(root: str, k: str, ready: str) -> None:
    def produce(out: Path) -> None:
        (out / "rank0.safetensors").write_bytes(b"partial")
        Path(ready).touch()
        time.sleep(60)

    CacheStore(root).build(k, "shard", produce)


def test_sigkill_mid_produce_leaves_no_entry(store, tmp_path):
    k, ready = key("k"), tmp_path / "ready"
    proc = multiprocessing.get_context("fork").Process(target=_build_then_hang, args=(str(store.root), k, str(ready)))
    proc.start()
    deadline = time.time() + 20
    while not ready.exists():
        assert time.time() < deadline and proc.is_alive(), "child never reached produce"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    assert proc.exitcode == -signal.SIGKILL

    assert store.get(k) is None
    leftovers = list((store.root / "tmp").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f"{k}.{proc.pid}.")
    # The kernel released the dead builder's lock: a new build runs and succeeds.
    entry = store.build(k, "shard", writer({"rank0.safetensors": b"complete"}))
    assert (entry.path / "rank0.safetensors").read_bytes() == b"complete"
    assert store.gc() == []
    assert list((store.root / "tmp").iterdir()) == []  # the stale temp dir is gone
    assert store.get(k) == entry


def test_gc_keeps_the_temp_dir_of_a_running_build(store):
    k = key("k")
    with store.lock(k):
        live = store._new_tmp(k, str(os.getpid()))
        store.gc()
        assert live.is_dir()
    store.gc()
    assert not live.exists()


def test_verify_finds_and_quarantines_a_flipped_byte(store, warnings_seen):
    good, bad = key("good"), key("bad")
    store.build(good, "convert", writer({"w.bin": b"\x00" * 64}))
    entry = store.build(bad, "convert", writer({"w.bin": b"\x00" * 64, "config.json": b"{}"}))
    target = entry.path / "w.bin"
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:
        f.seek(10)
        f.write(b"\x01")
    # bit rot under an unchanged fingerprint (simulated by sealing the rotten file again): only
    # a full re-hash notices
    (entry.path.parent / "seal.json").write_text(json.dumps(fingerprints(entry.path, entry.files)))
    assert store.get(bad) is not None

    assert store.verify() == [(bad, "w.bin content differs from its manifest sha256")]
    assert store.get(bad) is None and store.get(good) is not None
    quarantined = list((store.root / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(bad)
    assert "content differs" in (quarantined[0] / "QUARANTINED.txt").read_text()
    assert any(bad[:12] in w for w in warnings_seen)
    assert store.verify() == []


def test_verify_reports_extra_files(store):
    entry = store.build(key("k"), "convert", writer({"a": b"1"}))
    (entry.path / "stray.tmp").write_bytes(b"")
    assert store.verify() == [(key("k"), "stray.tmp is not in the manifest")]


def test_get_quarantines_truncated_or_unreadable_entries(store, warnings_seen):
    truncated = store.build(key("t"), "convert", writer({"a.bin": b"12345"}))
    os.chmod(truncated.path / "a.bin", 0o644)
    (truncated.path / "a.bin").write_bytes(b"12")
    broken = store.build(key("m"), "convert", writer({"a.bin": b"x"}))
    (broken.path.parent / "manifest.json").write_text("{not json")
    missing = store.build(key("g"), "convert", writer({"a.bin": b"x"}))
    (missing.path / "a.bin").unlink()

    assert store.get(key("t")) is None and store.get(key("m")) is None and store.get(key("g")) is None
    assert not store.entry_dir(key("t")).exists()
    assert len(list((store.root / "quarantine").iterdir())) == 3
    assert [w.split(" (")[1].split(")")[0] for w in warnings_seen] == [
        "a.bin has 2 bytes, manifest says 5", "manifest.json is missing or unreadable", "a.bin is missing"]
    # A quarantined key is simply missing: the next build rebuilds it.
    assert store.build(key("t"), "convert", writer({"a.bin": b"12345"})).files["a.bin"]["size"] == 5


def test_ls_lists_entries_least_recently_used_first(store):
    store.build(key("a"), "convert", writer({"x": b"123"}), recipe="r1")
    store.build(key("b"), "shard", writer({"x": b"1", "y": b"22"}))
    set_last_used(store, key("b"), 1000.0)
    listing = store.ls()
    assert [(e.key, e.stage, e.size, e.recipes) for e in listing] == [
        (key("b"), "shard", 3, ()), (key("a"), "convert", 3, ("r1",))]
    assert listing[0].last_used == 1000.0 and listing[1].created <= listing[1].last_used


def test_gc_by_size_removes_least_recently_used(store):
    for i, name in enumerate(("old", "mid", "new")):
        store.build(key(name), "convert", writer({"x": b"." * 100}))
        set_last_used(store, key(name), 1000.0 + i)
    assert gc_keys(store, max_size_bytes=250) == [key("old")]
    assert gc_keys(store, max_size_bytes=250) == []
    store.get(key("mid")).touch()  # now "new" is the least recently used
    assert gc_keys(store, max_size_bytes=100) == [key("new")]
    assert [e.key for e in store.ls()] == [key("mid")]


def test_gc_by_age(store):
    store.build(key("stale"), "convert", writer({"x": b"1"}))
    store.build(key("fresh"), "convert", writer({"x": b"1"}))
    set_last_used(store, key("stale"), time.time() - 40 * 86400)
    assert gc_keys(store, older_than_days=30) == [key("stale")]
    assert store.get(key("stale")) is None and store.get(key("fresh")) is not None


def test_gc_never_removes_an_entry_whose_lock_is_held(store):
    store.build(key("busy"), "convert", writer({"x": b"1"}))
    with store.lock(key("busy")):
        assert store.gc(max_size_bytes=0) == []
    assert gc_keys(store, max_size_bytes=0) == [key("busy")]


@pytest.mark.parametrize("text, expected", [
    ("1024", 1024), ("500M", 500 << 20), ("20G", 20 << 30), ("1.5T", int(1.5 * (1 << 40))),
    ("20GB", 20 << 30), ("20GiB", 20 << 30), ("4k", 4096), (" 2 G ", 2 << 30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "20X", "1.2.3M"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(UserError, match="e.g. 1024, 500M, 20G"):
        parse_size(text)


def test_gc_removes_leases_of_builds_that_died_and_keeps_live_ones(store):
    store.build(key("held"), "convert", writer({"x": b"1"}))
    store.build(key("free"), "convert", writer({"y": b"2"}))
    leases = store.root / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    (leases / "999999-dead.json").write_text(json.dumps({"keys": [key("free")], "tmp": []}))  # nobody holds it
    old_half = leases / "999999-half.new"
    old_half.write_text("")
    os.utime(old_half, (time.time() - 120, time.time() - 120))
    fresh_half = leases / "999999-fresh.new"
    fresh_half.write_text("")  # may be a lease being written right now
    with store.lease([key("held")]):
        assert gc_keys(store, max_size_bytes=0) == [key("free")]
        assert sorted(p.name for p in leases.iterdir() if p.suffix == ".new") == ["999999-fresh.new"]
        assert not (leases / "999999-dead.json").exists() and len(list(leases.glob("*.json"))) == 1
    assert gc_keys(store, max_size_bytes=0) == [key("held")]
    assert not list(leases.glob("*.json"))
