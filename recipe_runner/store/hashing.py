"""Source file hashing, remembered across runs.

Hashing a 70B model's safetensors (~140 GB) takes minutes, and `recipe plan` must know
every source hash to compute cache keys. `HashMemo` remembers each file's sha256 in a
small sqlite database, keyed by what changes when the file is rewritten: absolute
path, size, mtime_ns and inode. Any of those changing means the file is read again.

Several `recipe` processes may share one memo: sqlite serializes the writes (WAL
journal, busy timeout), and "database is locked" is retried. The memo is only an
accelerator: if its database is unusable, files are hashed without it. `hash_files` hashes the
files the memo does not know on several threads (reads and hashlib release the GIL), so a sharded
model hashes at the speed of the disk rather than of one core.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

CHUNK = 8 << 20  # 8 MiB: large enough to be I/O-bound, small enough to stay off the memory radar
# A file modified within this window of its hash may change again within the same mtime tick
# (coarse timestamps: FAT 2 s, some network filesystems 1 s) without its (size, mtime) changing;
# such "racy" hashes are returned but not remembered (the same trick git uses for its index).
RACY_WINDOW_NS = 2_000_000_000
_BUSY_RETRIES = 8
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))  # files hashed at once


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str

    def to_dict(self) -> dict[str, int | str]:
        return {"size": self.size, "sha256": self.sha256}


def sha256_file(path: Path | str, chunk: int = CHUNK) -> str:
    """The sha256 hex digest of a file, read in `chunk`-sized pieces (never whole)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _hash_stable(abspath: str, st: os.stat_result) -> tuple[os.stat_result, str, int]:
    """(stat, sha256, when hashing started) of a file that did not change while it was read."""
    for _ in range(3):
        started_ns = time.time_ns()
        sha = sha256_file(abspath)
        after = os.stat(abspath)
        if _identity(after) == _identity(st):
            return st, sha, started_ns
        st = after  # written to while we read it: the hash may mix versions, read again
    raise OSError(f"{abspath} keeps changing while it is hashed; wait for the writer to finish")


class HashMemo:
    """sha256 of files, memoized by (absolute path, size, mtime_ns, inode) in sqlite."""

    def __init__(self, db_path: Path | str):
        self.db_path = Path(db_path)  # the cache's state.sqlite3 (CacheStore.hash_memo)
        self._conn: sqlite3.Connection | None = None
        self._conn_pid = -1  # a connection must not cross fork(); reopen in a child
        self._disabled = False

    # -- public -------------------------------------------------------------------------

    def hash_file(self, path: Path | str, rehash: bool = False) -> str:
        """The file's sha256; read from the memo unless the file changed or `rehash`."""
        return self.digest(path, rehash).sha256

    def digest(self, path: Path | str, rehash: bool = False) -> FileDigest:
        """Size and sha256 of one file (the size is the one that was hashed)."""
        abspath = os.path.abspath(path)
        st = os.stat(abspath)
        if not rehash:
            known = self._lookup(abspath, st)
            if known is not None:
                return FileDigest(st.st_size, known)
        return self._hash_and_remember(abspath, st)

    def hash_files(self, paths: Iterable[Path | str], rehash: bool = False,
                   root: Path | str | None = None) -> dict[str, FileDigest]:
        """{name: FileDigest} for `paths`, sorted; names are posix paths relative to `root`,
        or bare file names without a root (which must then be unique). Files the memo does not
        know are hashed in parallel; the memo is read and written from this thread only."""
        out: dict[str, FileDigest] = {}
        todo: list[tuple[str, str, os.stat_result]] = []
        names: set[str] = set()
        for path in paths:
            path = Path(path)
            name = path.relative_to(root).as_posix() if root is not None else path.name
            if name in names:
                raise ValueError(f"two files named {name!r}; pass root= to name them by relative path")
            names.add(name)
            abspath = os.path.abspath(path)
            st = os.stat(abspath)
            known = None if rehash else self._lookup(abspath, st)
            if known is not None:
                out[name] = FileDigest(st.st_size, known)
            else:
                todo.append((name, abspath, st))
        with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(todo)))) as pool:
            hashed = list(pool.map(lambda t: _hash_stable(t[1], t[2]), todo))
        for (name, abspath, _), (st, sha, started_ns) in zip(todo, hashed):
            self._remember(abspath, st, sha, started_ns)
            out[name] = FileDigest(st.st_size, sha)
        return dict(sorted(out.items()))

    def close(self) -> None:
        if self._conn is not None and self._conn_pid == os.getpid():
            self._conn.close()
        self._conn = None

    # -- memo ---------------------------------------------------------------------------

    def _hash_and_remember(self, abspath: str, st: os.stat_result) -> FileDigest:
        st, sha, started_ns = _hash_stable(abspath, st)
        self._remember(abspath, st, sha, started_ns)
        return FileDigest(st.st_size, sha)

    def _remember(self, abspath: str, st: os.stat_result, sha: str, started_ns: int) -> None:
        if st.st_mtime_ns < started_ns - RACY_WINDOW_NS:
            self._store(abspath, st, sha)

    def _lookup(self, abspath: str, st: os.stat_result) -> str | None:
        row = self._execute("SELECT size, mtime_ns, inode, sha256 FROM file_hashes WHERE path = ?",
                            (abspath,), fetch=True)
        if row and tuple(row[:3]) == _identity(st):
            return row[3]
        return None

    def _store(self, abspath: str, st: os.stat_result, sha: str) -> None:
        self._execute("INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, inode, sha256) "
                      "VALUES (?, ?, ?, ?, ?)", (abspath, *_identity(st), sha))

    def _execute(self, sql: str, args: tuple, fetch: bool = False):
        """Run one statement in its own transaction; retries while another process writes."""
        for attempt in range(_BUSY_RETRIES):
            if self._disabled:
                return None
            try:
                conn = self._connection()
                with conn:  # commits, or rolls back on error
                    cursor = conn.execute(sql, args)
                    return cursor.fetchone() if fetch else None
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    return self._give_up(exc)
                time.sleep(0.05 * 2**attempt)
            except (sqlite3.DatabaseError, OSError) as exc:  # e.g. "file is not a database"
                return self._give_up(exc)
        logger.warning("hash memo %s stayed locked; hashing without it this time", self.db_path)
        return None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._conn_pid != os.getpid():
            self._conn = self._open()
            self._conn_pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            try:
                # WAL lets readers proceed while another process writes; some filesystems refuse it.
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise
            conn.execute("CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                         "mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 TEXT NOT NULL)")
        except BaseException:
            conn.close()
            raise
        return conn

    def _give_up(self, exc: Exception) -> None:
        logger.warning("hash memo %s is unusable (%s); hashing files without it", self.db_path, exc)
        self._disabled = True
        return None
