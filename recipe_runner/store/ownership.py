"""Which files in an output directory are recipe-runner's, and where an output or the cache may be.

Ownership: recipe-runner publishes only into a directory that does not exist, is empty, or holds
its marker (or an earlier recipe-runner's publish, from before generations, which it adopts); it
never replaces or deletes a file it did not write (a generation holding foreign files is kept,
with a warning). `force` admits a non-empty directory without the marker, and
still refuses to replace what is there.

The marker, <output.dir>/.recipe-runner/output.json, names the top-level links recipe-runner made
(the whole layout is in recipe_runner.store.publish's docstring). `OwnedDir` reads it and checks,
before any stage runs, that a build may publish into the directory; `OutputDir` (store/publish.py)
adds the publishing. `check_output_location` and `check_cache_location` keep an output and the
cache away from `/`, $HOME, the source model and each other.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

from recipe_runner.errors import UserError
from recipe_runner.store.fsutil import tree_files
from recipe_runner.store.lock import LOCK_NAME, LockFile

logger = logging.getLogger(__name__)

META = ".recipe-runner"
MARKER = "output.json"
MARKER_FORMAT = "recipe-runner/output/1"
# the names a publish uses for a moment (see OutputDir._init_meta, publish._replace_symlink)
TRANSIENT_RE = re.compile(rf"\.({re.escape(META)}\.new|.+\.link)-(\d+)-[0-9a-f]+")


class OwnedDir:
    """One recipe's output directory; `where` locates output.dir in its recipe for messages."""

    def __init__(self, path: Path, where: str = "output.dir", warn: Callable[[str], None] | None = None):
        self.path = Path(os.path.abspath(path))
        self.where = where
        self.meta = self.path / META
        self._warn = warn or logger.warning

    # -- checks, before any stage runs ----------------------------------------------------

    def check(self, names: set[str], force: bool = False) -> None:
        """Refuse an output directory this build may not publish into (a UserError saying why)."""
        path = self.path
        if os.path.lexists(path) and not path.is_dir():
            kind = "a broken symbolic link" if path.is_symlink() else "a file, not a directory"
            raise self._error(f"{path} is {kind}; choose another output.dir or move it away")
        if not path.exists():
            self._check_creatable()
            return
        # leave out the names a concurrent publish uses for a moment (see _init_meta, _replace_symlink)
        present = {name for name in os.listdir(path) if not TRANSIENT_RE.fullmatch(name)}
        ours = self.our_links() | legacy_publish(path)
        foreign = present - ours
        if self.marker() is None and foreign and not force:
            listed = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
            raise self._error(f"{path} is not empty and was not written by recipe-runner ({len(foreign)} "
                              f"entries: {listed}); choose an empty or new output.dir, or pass --force to "
                              "publish beside these files (none of them is changed or removed)")
        taken = sorted(n for n in names if n in present and n not in ours)
        if META in present and self.marker() is None:
            taken.insert(0, META)  # a .recipe-runner that is not ours
        if taken:
            raise self._error(f"{path / taken[0]} exists and was not written by recipe-runner; it would be "
                              "replaced by this build's output, so move it away (recipe-runner never replaces "
                              "files it did not write)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise self._error(f"{path} is not writable by this user; fix its permissions or choose another output.dir")

    def _check_creatable(self) -> None:
        parent = self.path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise self._error(f"cannot create {self.path}: {parent} is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise self._error(f"cannot create {self.path}: {parent} is not writable by this user")

    def _error(self, message: str) -> UserError:
        return UserError(f"{self.where}: {message}")

    # -- reading ------------------------------------------------------------------------

    def marker(self) -> dict | None:
        try:
            data = json.loads((self.meta / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or not isinstance(data.get("links"), list):
            return None
        return data

    def our_links(self) -> set[str]:
        """Top-level names that are links recipe-runner made and that still point where it made them."""
        marker = self.marker() or {"links": []}
        return {name for name in marker["links"] if isinstance(name, str) and is_our_link(self.path, name)}


# What recipe-runner 0.1 published: real directories and a regular recipe.lock beside them, with
# the engine's log in logs/ (not in the lock).
LEGACY_FOLDERS = ("checkpoint", "engine", "verify", "hf-modelopt", "hf-compressed-tensors")
LEGACY_LOG = "logs/build-engine.log"


def legacy_publish(root: Path) -> set[str]:
    """The top-level names of an earlier recipe-runner publish in `root`, from before generations:
    only when its recipe.lock lists exactly the files (names and sizes) under those folders."""
    lock_path = root / LOCK_NAME
    if lock_path.is_symlink() or not lock_path.is_file():
        return set()
    try:
        outputs = LockFile.from_json(lock_path.read_text(encoding="utf-8")).outputs
    except (OSError, ValueError):
        return set()
    folders = {rel.split("/", 1)[0] for rel in outputs}
    if not folders <= set(LEGACY_FOLDERS) or any((root / f).is_symlink() for f in folders):
        return set()
    present = {f"{folder}/{rel}" for folder in folders for rel in tree_files(root / folder)}
    if present != set(outputs) or any(os.path.getsize(root / rel) != f["size"] for rel, f in outputs.items()):
        return set()
    logs = root / "logs"
    with_logs = logs.is_dir() and not logs.is_symlink() and tree_files(logs) == {LEGACY_LOG.split("/", 1)[1]}
    return folders | {LOCK_NAME} | ({"logs"} if with_logs else set())


def is_our_link(root: Path, name: str) -> bool:
    path = root / name
    try:
        return path.is_symlink() and os.readlink(path) == f"{META}/current/{name}"
    except OSError:
        return False


def marker_text(links: list[str]) -> str:
    return json.dumps({"format": MARKER_FORMAT, "links": links}, indent=2) + "\n"


def check_output_location(out_dir: Path, where: str, source_dir: Path | None, cache_root: Path) -> None:
    """output.dir may not be `/` or $HOME itself, nor overlap the source model or the cache."""
    _refuse_overlaps(out_dir, f"{where}: {out_dir}", "choose an output.dir outside it",
                     ((source_dir, "the source model"), (cache_root, "the cache")))


def check_cache_location(cache_root: Path, source_dir: Path | None) -> None:
    """The cache may not be `/` or $HOME itself, nor overlap the source model (gc removes its files)."""
    _refuse_overlaps(cache_root, f"cache directory {cache_root} (--cache-dir or $RECIPE_CACHE_DIR)",
                     "choose a cache directory outside it", ((source_dir, "the source model"),))


def _refuse_overlaps(path: Path, subject: str, remedy: str, others) -> None:
    real = Path(os.path.realpath(path))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    if real == Path(real.anchor) or real == home:
        what = "the filesystem root" if real == Path(real.anchor) else "your home directory"
        raise UserError(f"{subject} is {what}; use a directory of its own, e.g. build/<recipe-name>")
    for other, what in others:
        if other is None:
            continue
        other = Path(os.path.realpath(other))
        if real == other or other.is_relative_to(real) or real.is_relative_to(other):
            relation = "is" if real == other else "contains" if other.is_relative_to(real) else "is inside"
            raise UserError(f"{subject} {relation} {what} ({other}); {remedy}")
