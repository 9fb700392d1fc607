"""Small filesystem helpers shared by the cache, publishing and the lock file."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


# ---- copies that never share bytes with their source -------------------------------------------
# Published outputs are copies of cache entries, never hardlinks: a user who edits a published file
# must not change the cache entry or another output (issue 14). Where the filesystem can, a copy
# is a reflink (FICLONE: btrfs, XFS with reflink, bcachefs, OCFS2; no bytes move, blocks are shared
# copy-on-write); elsewhere the kernel copies (os.copy_file_range, as cp does) in large ranges on
# several threads, and only where neither works do bytes pass through this process.

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
COPY_BLOCK = 256 << 20  # one task of the thread pool: large, so a 140 GB checkpoint is ~560 tasks
_NO_CLONE = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM,
             errno.EBADF, errno.ETXTBSY}
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


@dataclass
class CopyStats:
    files: int = 0
    bytes: int = 0
    reflinked: int = 0  # files whose blocks are shared copy-on-write (no bytes moved)


def copy_tree(src: Path, dest: Path, threads: int | None = None) -> CopyStats:
    """Copy every regular file and directory under `src` to the new directory `dest` (mode and
    times kept); symlinks are refused: cache entries hold only regular files."""
    stats = CopyStats()
    ranges: list[tuple[Path, Path, int, int]] = []
    copied: list[tuple[Path, Path]] = []
    dest.mkdir()
    dirs = [dest]
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames.sort()
        for name in dirnames:
            _refuse_link(Path(dirpath, name))
            (dest / rel / name).mkdir()
            dirs.append(dest / rel / name)
        for name in sorted(filenames):
            source, target = Path(dirpath, name), dest / rel / name
            _refuse_link(source)
            copied.append((source, target))
            size = source.stat().st_size
            stats.files += 1
            stats.bytes += size
            if _reflink(source, target):
                stats.reflinked += 1
                continue
            with open(target, "xb") as f:
                f.truncate(size)  # the ranges below fill it in any order
            ranges += [(source, target, offset, min(COPY_BLOCK, size - offset)) for offset in range(0, size, COPY_BLOCK)]
    if ranges:
        workers = max(1, min(threads or min(8, 2 * (os.cpu_count() or 1)), len(ranges)))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda r: _copy_range(*r), ranges))  # list(): re-raise the first error
    for source, target in copied:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.copystat(source, target)
    for directory in dirs:
        fsync_dir(directory)
    return stats


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise ValueError(f"{path}: a symbolic link where only regular files may be")


def _reflink(src: Path, dest: Path) -> bool:
    """Clone `src` to the new file `dest` copy-on-write; False (and no `dest`) where unsupported."""
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(fd, FICLONE, fin.fileno())
        except OSError as exc:
            os.close(fd)
            os.unlink(dest)
            if exc.errno in _NO_CLONE:
                return False
            raise
        os.close(fd)
    return True


def _copy_range(src: Path, dest: Path, offset: int, length: int) -> None:
    """Copy bytes [offset, offset+length) of `src` to the same place in `dest`, in the kernel
    where it can (releases the GIL, so the pool's threads copy at once)."""
    fd_in, fd_out = os.open(src, os.O_RDONLY), os.open(dest, os.O_WRONLY)
    try:
        use_kernel = hasattr(os, "copy_file_range")
        end = offset + length
        while offset < end:
            n = 0
            if use_kernel:
                try:
                    n = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                use_kernel = n > 0  # 0: unsupported for this pair (some filesystems copy nothing)
            if n == 0:
                chunk = os.pread(fd_in, min(end - offset, 16 << 20), offset)
                if not chunk:
                    raise OSError(errno.EIO, f"{src} ended before byte {end}")
                n = os.pwrite(fd_out, chunk, offset)
            offset += n
    finally:
        os.close(fd_in)
        os.close(fd_out)


# ---- fingerprints: a cheap check that files are as they were sealed ----------------------------
# (size, mtime_ns, ctime_ns, inode): any write, truncation, chmod or replacement changes at least
# one of them, and reading them is one stat per file. ctime cannot be set from user space, so an
# edit that restores mtime is still seen. A copy of the tree (a restore from backup) changes them
# too; then the caller re-hashes, and re-seals what still matches its sha256.

Fingerprint = list[int]


def fingerprint(path: Path) -> Fingerprint:
    st = os.stat(path, follow_symlinks=False)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def fingerprints(root: Path, names) -> dict[str, Fingerprint]:
    return {name: fingerprint(root / name) for name in sorted(names)}


def changed_files(root: Path, sealed: dict[str, Fingerprint]) -> list[str]:
    """The names whose fingerprint is not the sealed one (missing files included)."""
    out = []
    for name, want in sorted(sealed.items()):
        try:
            have = fingerprint(root / name)
        except OSError:
            have = None
        if have != list(want):
            out.append(name)
    return out


def tree_files(root: Path) -> set[str]:
    """Every non-directory under `root`, as posix relpaths."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out.update((rel / name).as_posix() for name in filenames)
        out.update((rel / name).as_posix() for name in dirnames if os.path.islink(os.path.join(dirpath, name)))
    return out


def seal_tree(root: Path, directories: bool = False) -> None:
    """fsync and chmod a-w every file under `root` (and, with `directories`, every directory,
    bottom-up), so neither a program nor a user without root edits it by accident."""
    no_write = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    if root.is_file():
        walk = [(str(root.parent), [], [root.name])]
    else:
        walk = os.walk(root, topdown=False)
    for dirpath, _dirnames, filenames in walk:
        for name in filenames:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(path, os.stat(path).st_mode & no_write)
        fsync_dir(Path(dirpath))
        if directories and dirpath != str(root.parent):
            os.chmod(dirpath, os.stat(dirpath).st_mode & no_write)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
