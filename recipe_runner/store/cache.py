"""The content-addressed store: one directory per cache key, complete or absent.

    <root>/entries/<key[:2]>/<key>/manifest.json   {"key", "stage", "files": {relpath: {size, sha256}}}
                                   /seal.json       each file's fingerprint once sealed (fsutil.fingerprint)
                                   /info.json       created, last_used, recipes (bookkeeping, not content)
                                   /data/...        the payload; files are read-only
    <root>/tmp/<key>.<pid>.<random>/               entries being built (never trusted)
    <root>/tmp/scratch.<pid>.<random>/             stores of locked rebuilds (held by a lease)
    <root>/locks/<key>.lock                          one builder per key at a time
    <root>/leases/<pid>-<random>.json                keys a running build reads, flock()ed while it runs
    <root>/logs/                                     logs of failed stages (kept until gc)
    <root>/quarantine/                               corrupt entries moved aside, for inspection
    <root>/state.sqlite3                             the source-hash memo (recipe_runner.store.hashing)

An entry is built in a temp dir under the key's lock and renamed into place only when its
manifest is written and synced (its sha256s are those the streaming writer computed from the bytes as
it wrote them, io/written.py; only files without such a record are read back to be hashed), so a crash or a kill leaves a temp dir, never a half entry
(design rule 5). Nothing outside the cache links to an entry's files (outputs are copies), so an
entry changes only if someone edits the cache itself: `get` compares every file's fingerprint
(one stat) with its seal and re-hashes any file that differs; a file whose sha256 no longer
matches quarantines the entry, which is then rebuilt, never served. `verify` re-hashes everything.

`CacheStore` holds the store's operations; below it, store/entry.py reads and checks one entry's
files, store/leases.py holds the leases and store/gc.py what gc removes.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock, Timeout

from recipe_runner.store.entry import (DATA, INFO, MANIFEST, SEAL, Entry, content_problem, entry_dirs, key_dir,
                                       key_lock, load_entry, manifest_records, missing_or_resized, write_json)
from recipe_runner.store.fsutil import fingerprints, fsync_dir, rmtree, seal_tree
from recipe_runner.store.gc import EntryInfo, collect, list_entries
from recipe_runner.store.hashing import HashMemo
from recipe_runner.store.leases import Lease

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """`$RECIPE_CACHE_DIR`, else `~/.cache/recipe-runner`."""
    return Path(os.environ.get("RECIPE_CACHE_DIR") or "~/.cache/recipe-runner").expanduser()


class CacheStore:
    def __init__(self, root: Path | str | None = None, warn: Callable[[str], None] | None = None):
        self.root = Path(root) if root is not None else default_cache_root()
        self._warn = warn or logger.warning
        self._memo: HashMemo | None = None

    # -- layout -------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        return key_dir(self.root, key)

    def lock(self, key: str, timeout: float = -1) -> FileLock:
        """The key's build lock (held while an entry is produced, and by gc while removing it)."""
        return key_lock(self.root, key, timeout)

    def hash_memo(self) -> HashMemo:
        if self._memo is None:
            self._memo = HashMemo(self.root / "state.sqlite3")
        return self._memo

    def lease(self, keys: Iterable[str], scratch: bool = False) -> Lease[CacheStore]:
        """Hold `keys` (and, with `scratch`, a new empty store in tmp/ for a rebuild that must not
        trust the cache) against gc for as long as the lease is held."""
        return Lease(self.root, sorted(set(keys)), partial(CacheStore, warn=self._warn) if scratch else None)


    # -- read ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The complete entry for `key`, or None. A malformed entry is quarantined, with a warning."""
        entry_dir = self.entry_dir(key)
        if not entry_dir.is_dir():
            return None
        entry, problem = load_entry(entry_dir, key)
        if problem is None:
            problem = entry.problem()
        if problem is not None:
            self._quarantine(entry_dir, key, problem)
            return None
        return entry

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # -- write --------------------------------------------------------------------------

    def build(self, key: str, stage: str, produce: Callable[[Path], None], recipe: str | None = None,
              on_wait: Callable[[Path], None] = lambda _: None) -> Entry:
        """The entry for `key`, running `produce(data_dir)` to fill it if no process has yet.

        One builder per key: others wait on the lock (calling `on_wait(lock file)` once, first)
        and then find the finished entry. If `produce` raises, its partial output is removed and
        nothing enters the cache.
        """
        entry = self.get(key)
        if entry is None:
            lock = self.lock(key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                on_wait(Path(lock.lock_file))
                lock.acquire()
            try:
                entry = self.get(key)  # built by another process while we waited?
                if entry is None:
                    entry = self._produce(key, stage, produce, recipe)
            finally:
                lock.release()
        entry.touch(recipe)
        return entry

    def _produce(self, key: str, stage: str, produce: Callable[[Path], None], recipe: str | None) -> Entry:
        tmp = self._new_tmp(key, str(os.getpid()))
        try:
            (tmp / DATA).mkdir()
            produce(tmp / DATA)
            files = manifest_records(tmp / DATA)  # the digests recorded while writing; hashes the rest
            manifest = {"key": key, "stage": stage, "files": files}
            now = time.time()
            write_json(tmp / MANIFEST, manifest)
            write_json(tmp / INFO, {"created": now, "last_used": now, "recipes": [recipe] if recipe else []})
            seal_tree(tmp / DATA)
            write_json(tmp / SEAL, fingerprints(tmp / DATA, files))
            final = self.entry_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)  # atomic: the entry appears complete or not at all
            fsync_dir(final.parent)
        except BaseException:
            rmtree(tmp)
            raise
        return Entry(key, stage, final / DATA, files)

    def _new_tmp(self, key: str, tag: str) -> Path:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{key}.{tag}.{secrets.token_hex(4)}"
        tmp.mkdir()
        return tmp

    # -- maintenance --------------------------------------------------------------------

    def ls(self) -> list[EntryInfo]:
        """Every entry whose manifest reads, oldest use first (no hashing, no quarantine)."""
        return list_entries(self.root)

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every entry; quarantine and report (key, problem) for each corrupt one."""
        problems = []
        for entry_dir in entry_dirs(self.root):
            key = entry_dir.name
            entry, problem = load_entry(entry_dir, key)
            if problem is None:
                problem = missing_or_resized(entry) or content_problem(entry)
            if problem is not None:
                self._quarantine(entry_dir, key, problem)
                problems.append((key, problem))
        return problems

    def gc(self, max_size_bytes: int | None = None, older_than_days: float | None = None,
           dry_run: bool = False) -> list[EntryInfo]:
        """Remove entries unused for `older_than_days`, then least-recently-used ones until the
        store holds at most `max_size_bytes`; also stale temp dirs, failure logs and the
        quarantine. Entries a running build holds (its lease, or the key's build lock) and its
        temp and scratch dirs are never removed. Returns the entries removed (with `dry_run`:
        that would be removed; nothing is). See recipe_runner.store.gc."""
        return collect(self.root, max_size_bytes, older_than_days, dry_run)

    def _quarantine(self, entry_dir: Path, key: str, problem: str) -> None:
        dest = self.root / "quarantine" / f"{entry_dir.name}.{int(time.time())}.{secrets.token_hex(4)}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(entry_dir, dest)
        except FileNotFoundError:
            return  # already moved or removed by another process
        try:
            (dest / "QUARANTINED.txt").write_text(problem + "\n")  # for whoever inspects it later
        except OSError:
            pass
        self._warn(f"cache entry {key[:12]} is corrupt ({problem}); moved to {dest}, it will be rebuilt")


def failure_log_path(data_dir: Path, stage: str) -> Path:
    """Where the log of a stage that failed while filling `data_dir` is kept: <root>/logs/, since
    its entry is never made (data_dir is <root>/tmp/<key>.<tag>.<random>/data; see _produce)."""
    tmp = Path(data_dir).parent
    return tmp.parent.parent / "logs" / f"{stage}-{tmp.name.split('.', 1)[0][:12]}.log"
