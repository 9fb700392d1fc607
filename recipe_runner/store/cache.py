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
manifest is written and synced, so a crash or a kill leaves a temp dir, never a half entry
(design rule 5). Nothing outside the cache links to an entry's files (outputs are copies), so an
entry changes only if someone edits the cache itself: `get` compares every file's fingerprint
(one stat) with its seal and re-hashes any file that differs; a file whose sha256 no longer
matches quarantines the entry, which is then rebuilt, never served. `verify` re-hashes everything.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from filelock import FileLock, Timeout

from recipe_runner.errors import UserError
from recipe_runner.store.fsutil import atomic_write_text, changed_files, fingerprints, fsync_dir, rmtree, seal_tree
from recipe_runner.store.hashing import HashMemo, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SEAL = "seal.json"
INFO = "info.json"
DATA = "data"
_KEY_RE = re.compile(r"[0-9a-f]{8,128}")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def default_cache_root() -> Path:
    """`$RECIPE_CACHE_DIR`, else `~/.cache/recipe-runner`."""
    return Path(os.environ.get("RECIPE_CACHE_DIR") or "~/.cache/recipe-runner").expanduser()


def parse_size(text: str) -> int:
    """Bytes in "1024", "500M", "20G", "1.5T" (binary units; "GB", "GiB" and "g" also accepted)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read size {text!r}: write a number of bytes with an optional unit, "
                        "e.g. 1024, 500M, 20G, 1.5T")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


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
        return _missing_or_resized(self) or _unsealed_change(self)

    def touch(self, recipe: str | None = None) -> None:
        """Record a use (for gc's least-recently-used order) and, optionally, by which recipe."""
        info = _read_json(self.path.parent / INFO)
        info = info if isinstance(info, dict) else {}
        info["last_used"] = time.time()
        recipes = info.get("recipes") if isinstance(info.get("recipes"), list) else []
        info["recipes"] = sorted({*recipes, recipe}) if recipe else recipes
        try:
            _write_json(self.path.parent / INFO, info)
        except OSError as exc:  # bookkeeping only: a read-only cache or a concurrent gc must not fail a build
            logger.debug("could not record use of cache entry %s: %s", self.key, exc)


@dataclass(frozen=True)
class EntryInfo:
    key: str
    stage: str
    size: int
    created: float  # unix time
    last_used: float
    recipes: tuple[str, ...]


class CacheStore:
    def __init__(self, root: Path | str | None = None, warn: Callable[[str], None] | None = None):
        self.root = Path(root) if root is not None else default_cache_root()
        self._warn = warn or logger.warning
        self._memo: HashMemo | None = None

    # -- layout -------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        _check_key(key)
        return self.root / "entries" / key[:2] / key

    def lock(self, key: str, timeout: float = -1) -> FileLock:
        """The key's build lock (held while an entry is produced, and by gc while removing it)."""
        _check_key(key)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / "locks" / f"{key}.lock", timeout=timeout)

    def hash_memo(self) -> HashMemo:
        if self._memo is None:
            self._memo = HashMemo(self.root / "state.sqlite3")
        return self._memo

    def lease(self, keys: Iterable[str], scratch: bool = False) -> "Lease":
        """Hold `keys` (and, with `scratch`, a new empty store in tmp/ for a rebuild that must not
        trust the cache) against gc for as long as the lease is held."""
        return Lease(self, sorted(set(keys)), scratch)


    # -- read ---------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The complete entry for `key`, or None. A malformed entry is quarantined, with a warning."""
        entry_dir = self.entry_dir(key)
        if not entry_dir.is_dir():
            return None
        entry, problem = _load_entry(entry_dir, key)
        if problem is None:
            problem = entry.problem()
        if problem is not None:
            self._quarantine(entry_dir, key, problem)
            return None
        return entry

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    # -- write --------------------------------------------------------------------------

    def build(self, key: str, stage: str, produce: Callable[[Path], None], recipe: str | None = None) -> Entry:
        """The entry for `key`, running `produce(data_dir)` to fill it if no process has yet.

        One builder per key: others wait on the lock and then find the finished entry.
        If `produce` raises, its partial output is removed and nothing enters the cache.
        """
        entry = self.get(key)
        if entry is None:
            with self.lock(key):
                entry = self.get(key)  # built by another process while we waited?
                if entry is None:
                    entry = self._produce(key, stage, produce, recipe)
        entry.touch(recipe)
        return entry

    def _produce(self, key: str, stage: str, produce: Callable[[Path], None], recipe: str | None) -> Entry:
        tmp = self._new_tmp(key, str(os.getpid()))
        try:
            (tmp / DATA).mkdir()
            produce(tmp / DATA)
            files = _hash_tree(tmp / DATA)
            manifest = {"key": key, "stage": stage, "files": files}
            now = time.time()
            _write_json(tmp / MANIFEST, manifest)
            _write_json(tmp / INFO, {"created": now, "last_used": now, "recipes": [recipe] if recipe else []})
            seal_tree(tmp / DATA)
            _write_json(tmp / SEAL, fingerprints(tmp / DATA, files))
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
        out = []
        for entry_dir in self._entry_dirs():
            entry, problem = _load_entry(entry_dir, entry_dir.name)
            if problem is None:
                out.append(_entry_info(entry))
        return sorted(out, key=lambda e: (e.last_used, e.key))

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every entry; quarantine and report (key, problem) for each corrupt one."""
        problems = []
        for entry_dir in self._entry_dirs():
            key = entry_dir.name
            entry, problem = _load_entry(entry_dir, key)
            if problem is None:
                problem = _missing_or_resized(entry) or _content_problem(entry)
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
        that would be removed; nothing is)."""
        if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
            raise UserError(f"--older-than {older_than_days}: give a number of days >= 0")
        if max_size_bytes is not None and max_size_bytes < 0:
            raise UserError(f"--max-size {max_size_bytes}: give a size >= 0")
        held_keys, held_tmp = self._leased()
        if not dry_run:
            self._remove_stale_tmp(held_tmp)
            rmtree(self.root / "quarantine")
            rmtree(self.root / "logs")
        every = self.ls()  # least recently used first
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
        return [info for key, info in doomed.items() if self._remove_entry(key)]

    def _leased(self) -> tuple[set[str], set[str]]:
        """Keys and tmp/ names that running builds hold; leases of builds that are gone are removed."""
        keys: set[str] = set()
        tmp_names: set[str] = set()
        leases = self.root / "leases"
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
                    data = _read_json(lease_file)
                    if isinstance(data, dict):
                        keys.update(k for k in data.get("keys", ()) if isinstance(k, str))
                        tmp_names.update(n for n in data.get("tmp", ()) if isinstance(n, str))
                    continue
                lease_file.unlink(missing_ok=True)  # nobody holds it: its build died (or died writing it)
            finally:
                os.close(fd)
        return keys, tmp_names

    def _remove_entry(self, key: str) -> bool:
        try:
            with self.lock(key, timeout=0):
                entry_dir = self.entry_dir(key)
                if not entry_dir.is_dir():
                    return False
                # Rename first, so readers see the entry whole or gone, never half deleted.
                doomed = self.root / "tmp" / f"{key}.gc.{secrets.token_hex(4)}"
                (self.root / "tmp").mkdir(parents=True, exist_ok=True)
                os.rename(entry_dir, doomed)
                rmtree(doomed)
                return True
        except Timeout:
            return False

    def _remove_stale_tmp(self, held: set[str]) -> None:
        """Temp dirs whose key is not locked, and scratch stores no lease holds, belong to a
        build that died (or a gc that did)."""
        tmp_root = self.root / "tmp"
        if not tmp_root.is_dir():
            return
        for tmp in tmp_root.iterdir():
            if tmp.name in held:
                continue
            key = tmp.name.split(".", 1)[0]
            if not _KEY_RE.fullmatch(key):
                rmtree(tmp)
                continue
            try:
                with self.lock(key, timeout=0):
                    rmtree(tmp)
            except Timeout:
                pass  # a build of this key is running; its temp dir is live

    def _entry_dirs(self) -> Iterator[Path]:
        entries = self.root / "entries"
        if not entries.is_dir():
            return
        for prefix in sorted(entries.iterdir()):
            if prefix.is_dir():
                yield from sorted(p for p in prefix.iterdir() if p.is_dir())

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


class Lease:
    """A running build's claim on cache entries: a JSON file in <root>/leases/ naming its keys,
    flock()ed for as long as the build runs, so gc sees it is live, and sees it is stale once the
    build's process is gone, however it ended (the kernel drops the lock)."""

    def __init__(self, store: CacheStore, keys: list[str], scratch: bool):
        self.store = store
        self.keys = keys
        self.scratch_name = f"scratch.{os.getpid()}.{secrets.token_hex(4)}" if scratch else None
        self.scratch: CacheStore | None = None
        self._fd: int | None = None
        self._path: Path | None = None

    def __enter__(self) -> "Lease":
        leases = self.store.root / "leases"
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
        if self.scratch_name:
            root = self.store.root / "tmp" / self.scratch_name
            root.mkdir(parents=True)
            self.scratch = CacheStore(root, self.store._warn)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.scratch is not None:
            rmtree(self.scratch.root)
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)


# -- entry files ------------------------------------------------------------------------


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _check_key(key: str) -> None:
    # The key becomes a path: refuse anything but a hex digest (no "..", no separators).
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"cache key must be a lowercase hex digest, got {key!r}")


def _load_entry(entry_dir: Path, key: str) -> tuple[Entry | None, str | None]:
    """The entry described by the manifest, or a description of what is wrong with it."""
    manifest = _read_json(entry_dir / MANIFEST)
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


def _missing_or_resized(entry: Entry) -> str | None:
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
    seal = _read_json(seal_path)
    sealed = seal if isinstance(seal, dict) and set(seal) == set(entry.files) else dict.fromkeys(entry.files, [])
    changed = changed_files(entry.path, sealed)
    for name in changed:
        if sha256_file(entry.path / name) != entry.files[name]["sha256"]:
            return f"{name} was changed after the entry was sealed (its sha256 differs from the manifest)"
    if changed:
        try:
            _write_json(seal_path, fingerprints(entry.path, entry.files))
        except OSError as exc:  # a read-only cache: the next use hashes again, still correct
            logger.debug("could not reseal cache entry %s: %s", entry.key, exc)
    return None


def _content_problem(entry: Entry) -> str | None:
    try:
        extra = sorted(set(_hash_tree(entry.path, hash_files=False)) - set(entry.files))
    except ValueError as exc:
        return str(exc)
    if extra:
        return f"{extra[0]} is not in the manifest"
    for name, f in sorted(entry.files.items()):
        if sha256_file(entry.path / name) != f["sha256"]:
            return f"{name} content differs from its manifest sha256"
    return None


def _entry_info(entry: Entry) -> EntryInfo:
    entry_dir = entry.path.parent
    info = _read_json(entry_dir / INFO)
    info = info if isinstance(info, dict) else {}
    try:
        fallback = (entry_dir / MANIFEST).stat().st_mtime  # info.json lost: the build time will do
    except OSError:
        fallback = 0.0
    created = info.get("created", fallback)
    return EntryInfo(entry.key, entry.stage, entry.size, created, info.get("last_used", created),
                     tuple(info.get("recipes", ())))


def _hash_tree(data: Path, hash_files: bool = True) -> dict[str, dict]:
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


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")
