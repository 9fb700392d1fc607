"""One cache entry and its files (the layout is in recipe_runner.store.cache's docstring).

Where an entry lives under a store's root and the key's build lock; `Entry`, what a complete entry
holds; reading and checking its manifest (`load_entry`); its seal, checked by fingerprint with a
re-hash of only the files that differ (`Entry.problem`), or every file re-hashed (`content_problem`);
the manifest's file records of a payload (`hash_tree`), and of a payload just produced, from the
digests its writers recorded as they wrote (`manifest_records`). Nothing here knows a store beyond its
root.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from recipe_runner.io.written import forget_written, written_sha256
from recipe_runner.store.fsutil import atomic_write_text, changed_files, fingerprints
from recipe_runner.store.hashing import HASH_THREADS, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SEAL = "seal.json"
INFO = "info.json"
DATA = "data"
KEY_RE = re.compile(r"[0-9a-f]{8,128}")


# -- where entries live -------------------------------------------------------------------


def check_key(key: str) -> None:
    # The key becomes a path: refuse anything but a hex digest (no "..", no separators).
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"cache key must be a lowercase hex digest, got {key!r}")


def key_dir(root: Path, key: str) -> Path:
    """The entry directory of `key` under the store's root."""
    check_key(key)
    return root / "entries" / key[:2] / key


def key_lock(root: Path, key: str, timeout: float = -1) -> FileLock:
    """The key's build lock (held while an entry is produced, and by gc while removing it)."""
    check_key(key)
    (root / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(root / "locks" / f"{key}.lock", timeout=timeout)


def entry_dirs(root: Path) -> Iterator[Path]:
    entries = root / "entries"
    if not entries.is_dir():
        return
    for prefix in sorted(entries.iterdir()):
        if prefix.is_dir():
            yield from sorted(p for p in prefix.iterdir() if p.is_dir())


# -- an entry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    key: str
    stage: str
    path: Path  # the payload directory (entry/data)
    files: dict = field(repr=False, hash=False)  # manifest "files": {relpath: {"size", "sha256"}}

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def problem(self) -> str | None:
        """What is wrong with the entry's files now (None: they are as sealed, or re-hash equal)."""
        return missing_or_resized(self) or _unsealed_change(self)

    def touch(self, recipe: str | None = None) -> None:
        """Record a use (for gc's least-recently-used order) and, optionally, by which recipe."""
        info = read_json(self.path.parent / INFO)
        info = info if isinstance(info, dict) else {}
        info["last_used"] = time.time()
        recipes = info.get("recipes") if isinstance(info.get("recipes"), list) else []
        info["recipes"] = sorted({*recipes, recipe}) if recipe else recipes
        try:
            write_json(self.path.parent / INFO, info)
        except OSError as exc:  # bookkeeping only: a read-only cache or a concurrent gc must not fail a build
            logger.debug("could not record use of cache entry %s: %s", self.key, exc)


# -- entry files ------------------------------------------------------------------------


def load_entry(entry_dir: Path, key: str) -> tuple[Entry | None, str | None]:
    """The entry described by the manifest, or a description of what is wrong with it."""
    manifest = read_json(entry_dir / MANIFEST)
    if manifest is None:
        return None, "manifest.json is missing or unreadable"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("stage"), str):
        return None, "manifest.json is malformed"
    if manifest.get("key") != key or entry_dir.parent.name != key[:2]:
        return None, f"manifest.json names key {manifest.get('key')!r}, not the one its directory holds"
    for name, f in files.items():
        if not (isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
                and _safe_relpath(name)):
            return None, f"manifest.json has a malformed record for {name!r}"
    return Entry(key, manifest["stage"], entry_dir / DATA, files), None


def _safe_relpath(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


def missing_or_resized(entry: Entry) -> str | None:
    for name, f in entry.files.items():
        try:
            st = os.stat(entry.path / name)
        except OSError:
            return f"{name} is missing"
        if not stat.S_ISREG(st.st_mode) or st.st_size != f["size"]:
            return f"{name} has {st.st_size} bytes, manifest says {f['size']}"
    return None


def _unsealed_change(entry: Entry) -> str | None:
    """Re-hash the files whose fingerprint is not the sealed one; a problem if any content changed.
    Files that still match (a restored backup has new inodes and times) are sealed again."""
    seal_path = entry.path.parent / SEAL
    seal = read_json(seal_path)
    sealed = seal if isinstance(seal, dict) and set(seal) == set(entry.files) else dict.fromkeys(entry.files, [])
    changed = changed_files(entry.path, sealed)
    for name in changed:
        if sha256_file(entry.path / name) != entry.files[name]["sha256"]:
            return f"{name} was changed after the entry was sealed (its sha256 differs from the manifest)"
    if changed:
        try:
            write_json(seal_path, fingerprints(entry.path, entry.files))
        except OSError as exc:  # a read-only cache: the next use hashes again, still correct
            logger.debug("could not reseal cache entry %s: %s", entry.key, exc)
    return None


def content_problem(entry: Entry) -> str | None:
    try:
        extra = sorted(set(hash_tree(entry.path, hash_files=False)) - set(entry.files))
    except ValueError as exc:
        return str(exc)
    if extra:
        return f"{extra[0]} is not in the manifest"
    for name, f in sorted(entry.files.items()):
        if sha256_file(entry.path / name) != f["sha256"]:
            return f"{name} content differs from its manifest sha256"
    return None


def hash_tree(data: Path, hash_files: bool = True) -> dict[str, dict]:
    """{posix relpath: {size, sha256}} of every file under `data`, sorted."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(data):
        dirnames.sort()
        # os.walk lists a link to a directory among dirnames (and does not follow it): check both.
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = Path(dirpath, name)
            rel = path.relative_to(data).as_posix()
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"{rel}: only regular files can be cached (links and devices cannot be hashed)")
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path) if hash_files else ""}
    return dict(sorted(files.items()))


def manifest_records(data: Path) -> dict[str, dict]:
    """`hash_tree(data)` of a payload just produced, without reading back what the streaming writer
    wrote: a file that carries the record of its bytes as written (io/written.py) and is still that
    file gets the recorded sha256; only the others (small JSON files, a file system without xattrs)
    are hashed, on a few threads. The records are removed: from now on the manifest holds them."""
    files = hash_tree(data, hash_files=False)

    def record(rel: str) -> dict:
        path = data / rel
        st = os.stat(path)
        sha = written_sha256(path, st)
        if sha is None:
            return {"size": st.st_size, "sha256": sha256_file(path)}
        forget_written(path)
        return {"size": st.st_size, "sha256": sha}

    with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(files)))) as pool:
        return dict(zip(files, pool.map(record, files)))


def read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")
