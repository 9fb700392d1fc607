"""Garbage collection of the cache (CacheStore.gc, CacheStore.ls): which entries go and removing them.

Entries unused for a while go first, then the least recently used until the store fits a size
(`parse_size` reads --max-size); entries and temp dirs that running builds hold (leases, build
locks) stay. `EntryInfo` is an entry's bookkeeping (info.json), the order gc removes in.
Nothing here knows a store beyond its root.
"""
from __future__ import annotations

import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout

from recipe_runner.errors import UserError
from recipe_runner.store import leases
from recipe_runner.store.entry import INFO, KEY_RE, MANIFEST, Entry, entry_dirs, key_dir, key_lock, load_entry, read_json
from recipe_runner.store.fsutil import rmtree

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes in "1024", "500M", "20G", "1.5T" (binary units; "GB", "GiB" and "g" also accepted)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read size {text!r}: write a number of bytes with an optional unit, "
                        "e.g. 1024, 500M, 20G, 1.5T")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class EntryInfo:
    key: str
    stage: str
    size: int
    created: float  # unix time
    last_used: float
    recipes: tuple[str, ...]


def list_entries(root: Path) -> list[EntryInfo]:
    """CacheStore.ls of the store at `root`."""
    out = []
    for entry_dir in entry_dirs(root):
        entry, problem = load_entry(entry_dir, entry_dir.name)
        if problem is None:
            out.append(_entry_info(entry))
    return sorted(out, key=lambda e: (e.last_used, e.key))


def collect(root: Path, max_size_bytes: int | None = None, older_than_days: float | None = None,
            dry_run: bool = False) -> list[EntryInfo]:
    """CacheStore.gc on the store at `root`."""
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise UserError(f"--older-than {older_than_days}: give a number of days >= 0")
    if max_size_bytes is not None and max_size_bytes < 0:
        raise UserError(f"--max-size {max_size_bytes}: give a size >= 0")
    held_keys, held_tmp = leases.held(root)
    if not dry_run:
        _remove_stale_tmp(root, held_tmp)
        rmtree(root / "quarantine")
        rmtree(root / "logs")
    every = list_entries(root)  # least recently used first
    entries = [e for e in every if e.key not in held_keys]
    doomed: dict[str, EntryInfo] = {}
    if older_than_days is not None:
        cutoff = time.time() - older_than_days * 86400
        doomed = {e.key: e for e in entries if e.last_used < cutoff}
    if max_size_bytes is not None:
        total = sum(e.size for e in every if e.key not in doomed)
        for e in entries:
            if total <= max_size_bytes:
                break
            if e.key not in doomed:
                doomed[e.key] = e
                total -= e.size
    if dry_run:
        return list(doomed.values())
    return [info for key, info in doomed.items() if _remove_entry(root, key)]


def _remove_entry(root: Path, key: str) -> bool:
    try:
        with key_lock(root, key, timeout=0):
            entry_dir = key_dir(root, key)
            if not entry_dir.is_dir():
                return False
            # Rename first, so readers see the entry whole or gone, never half deleted.
            doomed = root / "tmp" / f"{key}.gc.{secrets.token_hex(4)}"
            (root / "tmp").mkdir(parents=True, exist_ok=True)
            os.rename(entry_dir, doomed)
            rmtree(doomed)
            return True
    except Timeout:
        return False


def _remove_stale_tmp(root: Path, held: set[str]) -> None:
    """Temp dirs whose key is not locked, and scratch stores no lease holds, belong to a
    build that died (or a gc that did)."""
    tmp_root = root / "tmp"
    if not tmp_root.is_dir():
        return
    for tmp in tmp_root.iterdir():
        if tmp.name in held:
            continue
        key = tmp.name.split(".", 1)[0]
        if not KEY_RE.fullmatch(key):
            rmtree(tmp)
            continue
        try:
            with key_lock(root, key, timeout=0):
                rmtree(tmp)
        except Timeout:
            pass  # a build of this key is running; its temp dir is live


def _entry_info(entry: Entry) -> EntryInfo:
    entry_dir = entry.path.parent
    info = read_json(entry_dir / INFO)
    info = info if isinstance(info, dict) else {}
    try:
        fallback = (entry_dir / MANIFEST).stat().st_mtime  # info.json lost: the build time will do
    except OSError:
        fallback = 0.0
    created = info.get("created", fallback)
    return EntryInfo(entry.key, entry.stage, entry.size, created, info.get("last_used", created),
                     tuple(info.get("recipes", ())))
