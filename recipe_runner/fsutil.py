"""Small filesystem helpers shared by the cache, publishing and the lock file."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def rmtree(path: Path) -> None:
    """Remove a tree, even one holding read-only directories; failures are logged, not raised,
    because every caller is cleaning up after work that already succeeded or already failed."""
    root = str(path)

    def make_writable_and_retry(func, failed, exc_info):
        parent = os.path.dirname(failed)
        if not isinstance(exc_info[1], PermissionError) or not parent.startswith(root):
            raise exc_info[1]
        os.chmod(parent, stat.S_IRWXU)
        func(failed)

    if not os.path.lexists(path):
        return
    try:
        shutil.rmtree(path, onerror=make_writable_and_retry)
    except FileNotFoundError:
        pass  # removed concurrently
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
