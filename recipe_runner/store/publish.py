"""Publish a build's outputs as one generation of its output directory.

    <output.dir>/
      checkpoint -> .recipe-runner/current/checkpoint   one relative symlink per artifact: engine,
      recipe.lock -> .recipe-runner/current/recipe.lock  verify, hf-modelopt, hf-compressed-tensors
      .recipe-runner/
        output.json              ownership marker: the links recipe-runner made here
        publish.lock             serialises publishes to this directory
        current -> generations/<id>
        generations/<id>/        checkpoint/ engine/ ... recipe.lock: copies of cache entries
        generations/<id>.seal.json  the fingerprint of every file the generation was published with
        staging/<pid>-<hex>/     a generation being assembled (never trusted, removed once its
                                 process is gone)

Everything a build publishes switches at once: the generation is assembled under staging/, moved
into generations/ and made current by renaming one symlink. The old generation, with every
artifact the new recipe no longer makes, goes with the switch; a kill at any step leaves either
the old generation or the new one current, whole. Files are copies (reflinks where the filesystem
shares blocks copy-on-write), never hardlinks into the cache: editing a published file changes
neither the cache nor another output.

Ownership (which files here are recipe-runner's, the marker, the checks before any stage runs)
and where an output or the cache may be are in recipe_runner.store.ownership; `OutputDir` adds
the publishing to its `OwnedDir`.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from filelock import FileLock

from recipe_runner.errors import UserError
from recipe_runner.store.lock import LOCK_NAME
from recipe_runner.store.fsutil import (CopyStats, atomic_write_text, changed_files, copy_tree, fingerprints, fsync_dir,
                                  pid_alive, rmtree, seal_tree, tree_files)
from recipe_runner.store.ownership import MARKER, META, TRANSIENT_RE, OwnedDir, is_our_link, legacy_publish, marker_text

_STAGING_RE = re.compile(r"(\d+)-[0-9a-f]+")


@dataclass(frozen=True)
class Generation:
    """What one publish puts in the output directory: cache payload directories by folder name,
    and small files written by the publish itself (the lock, reports naming the recipe)."""

    trees: Mapping[str, Path]  # top-level folder -> directory to copy
    files: Mapping[str, bytes]  # posix relpath -> bytes (may replace a file of a copied tree)

    @property
    def names(self) -> set[str]:
        return set(self.trees) | {rel.split("/", 1)[0] for rel in self.files}


class OutputDir(OwnedDir):
    """One recipe's output directory, published into one generation at a time."""

    # -- reading ------------------------------------------------------------------------

    def current(self) -> Path | None:
        try:
            target = os.readlink(self.meta / "current")
        except OSError:
            return None
        return self.meta / target

    def is_current(self, generation: Generation) -> bool:
        """Whether the current generation already holds exactly this lock, intact: then publishing
        again would copy the same bytes."""
        current = self.current()
        lock = generation.files.get(LOCK_NAME)
        if current is None or lock is None:
            return False
        try:
            if (current / LOCK_NAME).read_bytes() != lock:
                return False
        except OSError:
            return False
        seal = _read_seal(current)
        if seal is None or changed_files(current, seal):
            return False
        return all(is_our_link(self.path, name) for name in generation.names) and tree_files(current) == set(seal)

    # -- publishing ---------------------------------------------------------------------

    def publish(self, generation: Generation, force: bool = False) -> CopyStats:
        """Make `generation` the directory's current one; returns what was copied."""
        names = generation.names
        self.check(names, force)
        try:
            self._init_meta()
            staging = self.meta / "staging" / f"{os.getpid()}-{secrets.token_hex(4)}"
            try:
                stats = self._assemble(generation, staging)
                with FileLock(self.meta / "publish.lock"):
                    self.check(names, force)  # again: another publish may have run meanwhile
                    self._switch(staging, names)
            finally:
                rmtree(staging)
        except OSError as exc:
            raise _publish_error(exc, self.path) from None
        return stats

    def _init_meta(self) -> None:
        """Create .recipe-runner whole (marker included) or not at all."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.meta.is_dir():
            for sub in ("generations", "staging"):
                (self.meta / sub).mkdir(exist_ok=True)
            return
        tmp = self.path / f".{META}.new-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            atomic_write_text(tmp / MARKER, marker_text([]))
            for sub in ("generations", "staging"):
                (tmp / sub).mkdir()
            os.rename(tmp, self.meta)
        except OSError:
            rmtree(tmp)
            if not self.meta.is_dir():  # not a concurrent publish that won the race
                raise
        fsync_dir(self.path)

    def _assemble(self, generation: Generation, staging: Path) -> CopyStats:
        staging.mkdir(parents=True)
        stats = CopyStats()
        for folder, source in sorted(generation.trees.items()):
            copied = copy_tree(source, staging / folder)
            stats.files, stats.bytes = stats.files + copied.files, stats.bytes + copied.bytes
            stats.reflinked += copied.reflinked
        for rel, data in sorted(generation.files.items()):
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # replaces a copied (read-only) file of the same name
            atomic_write_text(path, data.decode("utf-8"))
        for child in staging.iterdir():
            seal_tree(child, directories=child.is_dir())  # the top folder stays writable: it is renamed
        return stats

    def _switch(self, staging: Path, names: set[str]) -> None:
        generations = self.meta / "generations"
        gen_id = f"{time.time_ns():x}-{secrets.token_hex(3)}"
        seal = fingerprints(staging, tree_files(staging))
        atomic_write_text(generations / f"{gen_id}.seal.json", json.dumps(seal, sort_keys=True) + "\n")
        os.rename(staging, generations / gen_id)
        fsync_dir(generations)
        self._adopt_legacy_publish()
        old_links = self.our_links()
        self._write_marker(old_links | names)  # before the links exist: a kill leaves them known as ours
        for name in sorted(names - old_links):
            _replace_symlink(self.path / name, f"{META}/current/{name}")
        _replace_symlink(self.meta / "current", f"generations/{gen_id}")  # the switch: one rename
        fsync_dir(self.meta)
        self._tidy(names)

    def tidy(self, names: set[str]) -> None:
        """Finish what a killed publish left: links of artifacts the current generation lacks,
        earlier generations, stale staging directories."""
        with FileLock(self.meta / "publish.lock"):
            self._tidy(names)

    def _tidy(self, names: set[str]) -> None:
        for name in sorted(self.our_links() - names):  # artifacts this recipe no longer makes
            (self.path / name).unlink(missing_ok=True)
        self._write_marker(names)
        fsync_dir(self.path)
        current = self.current()
        if current is not None:
            self._prune(current.name)

    def _adopt_legacy_publish(self) -> None:
        """Move an earlier recipe-runner's publish (real directories, see legacy_publish) into a
        generation of its own, which the prune then removes like any earlier generation."""
        legacy = legacy_publish(self.path)
        if not legacy:
            return
        gen = self.meta / "generations" / f"0-legacy-{secrets.token_hex(3)}"
        gen.mkdir()
        for name in sorted(legacy):
            os.rename(self.path / name, gen / name)
        seal = fingerprints(gen, tree_files(gen))
        atomic_write_text(gen.with_name(f"{gen.name}.seal.json"), json.dumps(seal, sort_keys=True) + "\n")

    def _write_marker(self, links: set[str]) -> None:
        atomic_write_text(self.meta / MARKER, marker_text(sorted(links)))

    def _prune(self, current_id: str) -> None:
        """Remove earlier generations (unless they hold files recipe-runner did not write), and
        staging directories of processes that are gone."""
        generations = self.meta / "generations"
        for gen in sorted(generations.iterdir()):
            if not gen.is_dir() or gen.name == current_id:
                continue
            seal = _read_seal(gen) or {}
            foreign = sorted(tree_files(gen) - set(seal) - {LOCK_NAME})
            if seal and foreign:
                self._warn(f"kept the earlier output generation {gen}: it holds files recipe-runner did not "
                           f"write ({', '.join(foreign[:3])}); move them out, then remove it")
                continue
            rmtree(gen)
            (generations / f"{gen.name}.seal.json").unlink(missing_ok=True)
        for seal_file in generations.glob("*.seal.json"):
            if not (generations / seal_file.name.removesuffix(".seal.json")).exists():
                seal_file.unlink(missing_ok=True)
        for leftover in (self.meta / "staging").iterdir():
            match = _STAGING_RE.fullmatch(leftover.name)
            if match is None or not pid_alive(int(match.group(1))):
                rmtree(leftover)
        for leftover in self.path.iterdir():
            match = TRANSIENT_RE.fullmatch(leftover.name)
            if match and not pid_alive(int(match.group(2))):
                if leftover.is_symlink():
                    leftover.unlink(missing_ok=True)
                else:
                    rmtree(leftover)


def _replace_symlink(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.link-{os.getpid()}-{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise



def _read_seal(generation: Path) -> dict | None:
    try:
        seal = json.loads(generation.with_name(f"{generation.name}.seal.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return seal if isinstance(seal, dict) else None


def _publish_error(exc: OSError, out_dir: Path) -> UserError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return UserError(f"{what} while publishing to {out_dir}; the previous output is unchanged. Free space "
                         "(`recipe cache gc` removes old cache entries) or choose an output.dir on another disk")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {exc.filename or out_dir}: {exc.strerror}; fix its permissions or choose "
                         "another output.dir (the previous output is unchanged)")
    return UserError(f"publishing to {out_dir} failed: {exc.strerror or exc} ({exc.filename or out_dir}); "
                     "the previous output is unchanged")


def swap_into_place(staging: Path, dest_dir: Path) -> None:
    """Rename a finished directory to dest_dir, replacing (and then removing) what was there;
    the previous directory is put back if the rename fails."""
    if not dest_dir.exists():
        os.rename(staging, dest_dir)
        fsync_dir(dest_dir.parent)
        return
    old = dest_dir.with_name(f".{dest_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(dest_dir, old)
    try:
        os.rename(staging, dest_dir)
    except BaseException:
        os.rename(old, dest_dir)  # put the previous output back
        raise
    fsync_dir(dest_dir.parent)
    rmtree(old)
