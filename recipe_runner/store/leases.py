"""Leases: the flock()ed files in <root>/leases/ by which running builds keep gc off what they use.

`Lease` is a build's side (CacheStore.lease makes one): the keys it reads and, for a locked
rebuild, the scratch store it builds in. `held` is gc's side: what the live leases name; the
leases of builds that are gone are removed. Nothing here knows a store beyond its root.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Generic, TypeVar

from recipe_runner.store.entry import read_json
from recipe_runner.store.fsutil import rmtree

S = TypeVar("S")  # the scratch store's type (a CacheStore; this module sits below cache.py)


class Lease(Generic[S]):
    """A running build's claim on cache entries: a JSON file in <root>/leases/ naming its keys,
    flock()ed for as long as the build runs, so gc sees it is live, and sees it is stale once the
    build's process is gone, however it ended (the kernel drops the lock).

    With `new_store`, the lease also holds a new empty store in <root>/tmp/ (`scratch`, made by
    `new_store(path)`), removed when the lease ends."""

    def __init__(self, root: Path, keys: list[str], new_store: Callable[[Path], S] | None = None):
        self.root = root
        self.keys = keys
        self.scratch_name = f"scratch.{os.getpid()}.{secrets.token_hex(4)}" if new_store else None
        self.scratch: S | None = None
        self._new_store = new_store
        self._fd: int | None = None
        self._path: Path | None = None

    def __enter__(self) -> "Lease[S]":
        leases = self.root / "leases"
        leases.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp = leases / f"{name}.new"
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # locked before gc can see it (it reads only *.json)
        body = {"keys": self.keys, "tmp": [self.scratch_name] if self.scratch_name else [], "pid": os.getpid()}
        os.write(self._fd, json.dumps(body, sort_keys=True).encode())
        os.fsync(self._fd)
        self._path = leases / f"{name}.json"
        os.rename(tmp, self._path)
        if self.scratch_name and self._new_store is not None:
            root = self.root / "tmp" / self.scratch_name
            root.mkdir(parents=True)
            self.scratch = self._new_store(root)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.scratch is not None:
            rmtree(self.root / "tmp" / self.scratch_name)
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)


def held(root: Path) -> tuple[set[str], set[str]]:
    """Keys and tmp/ names that running builds hold; leases of builds that are gone are removed."""
    keys: set[str] = set()
    tmp_names: set[str] = set()
    leases = root / "leases"
    # a .new lease is unlocked for a moment between its creation and its flock: only old ones are stale
    half_written = [p for p in leases.glob("*.new") if _age_seconds(p) > 60]
    for lease_file in sorted([*leases.glob("*.json"), *half_written]):
        try:
            fd = os.open(lease_file, os.O_RDONLY)
        except OSError:
            continue  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its build is running
                if lease_file.suffix == ".new":
                    continue  # being written; it is renamed to .json before the build reads anything
                data = read_json(lease_file)
                if isinstance(data, dict):
                    keys.update(k for k in data.get("keys", ()) if isinstance(k, str))
                    tmp_names.update(n for n in data.get("tmp", ()) if isinstance(n, str))
                continue
            lease_file.unlink(missing_ok=True)  # nobody holds it: its build died (or died writing it)
        finally:
            os.close(fd)
    return keys, tmp_names


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
