"""Publish a cache entry's payload as a user-visible directory.

The output is assembled next to its final place (same filesystem, so renames work), from
hardlinks where possible: a 140 GB checkpoint publishes in milliseconds and takes no extra
space. Cache payload files are read-only, so the shared inodes are not edited by accident.
Where links are impossible (another filesystem, a filesystem without them, a link-count
limit) files are copied. The finished tree replaces the old one by two renames; the old
one is deleted only after the new one is in place, and a failure before that point leaves
the previous output untouched.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.fsutil import fsync_dir, rmtree

logger = logging.getLogger(__name__)

# os.link errors that mean "cannot link here", not "something is broken": copy instead.
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES,
                   errno.ENOSYS}
_COPY_CHUNK = 8 << 20


def publish_tree(src_dir: Path | str, dest_dir: Path | str) -> None:
    """Make `dest_dir` an exact copy of `src_dir` (hardlinks where possible), replacing it whole."""
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"cannot publish {src_dir}: not a directory")
    if dest_dir.is_symlink() or (dest_dir.exists() and not dest_dir.is_dir()):
        raise UserError(f"output {dest_dir} exists and is not a directory; move it away or choose another output.dir")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest_dir)
    staging = _sibling(dest_dir, "publish")
    try:
        _populate(src_dir, staging)
        fsync_dir(staging)
        swap_into_place(staging, dest_dir)
    except BaseException:
        rmtree(staging)
        raise


def _populate(src_dir: Path, staging: Path) -> None:
    staging.mkdir()
    for dirpath, dirnames, filenames in os.walk(src_dir):
        rel = Path(dirpath).relative_to(src_dir)
        dirnames.sort()
        for name in dirnames:
            src = Path(dirpath, name)
            if src.is_symlink():  # os.walk does not descend into it; recreate the link itself
                os.symlink(os.readlink(src), staging / rel / name)
            else:
                (staging / rel / name).mkdir()
        for name in sorted(filenames):
            src, dest = Path(dirpath, name), staging / rel / name
            if src.is_symlink():
                os.symlink(os.readlink(src), dest)
            else:
                link_or_copy(src, dest)


def link_or_copy(src: Path, dest: Path) -> bool:
    """Hardlink `src` at `dest`, or copy it (bytes, mode, times) where links are impossible.
    Returns True when linked."""
    try:
        os.link(src, dest)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        logger.debug("cannot hardlink %s (%s); copying", src, exc)
    _copy_file(src, dest)
    return False


def _copy_file(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)  # streams in 8 MiB pieces, never the whole file
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dest)


def swap_into_place(staging: Path, dest_dir: Path) -> None:
    """Rename a finished directory to dest_dir, replacing (and then removing) what was there;
    the previous directory is put back if the rename fails."""
    if not dest_dir.exists():
        os.rename(staging, dest_dir)
        fsync_dir(dest_dir.parent)
        return
    old = _sibling(dest_dir, "old")
    os.rename(dest_dir, old)
    try:
        os.rename(staging, dest_dir)
    except BaseException:
        os.rename(old, dest_dir)  # put the previous output back
        raise
    fsync_dir(dest_dir.parent)
    rmtree(old)


def _sibling(dest_dir: Path, kind: str) -> Path:
    # Hidden, beside dest (same filesystem), named by pid so a later publish can tell it is stale.
    return dest_dir.with_name(f".{dest_dir.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_leftovers(dest_dir: Path) -> None:
    """Staging/old dirs left by a publish that was killed (its process is gone)."""
    pattern = re.compile(rf"\.{re.escape(dest_dir.name)}\.(publish|old)-(\d+)-[0-9a-f]+")
    for sibling in dest_dir.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not _pid_alive(int(match.group(2))):
            rmtree(sibling)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
