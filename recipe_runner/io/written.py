"""Records of files as they were written: size and sha256 of the bytes that went out, kept on the file.

The streaming safetensors writer hashes every byte on its way to the disk (io/sink.py) and, when the
file is complete, records the digest in an extended attribute of the file itself (`user.recipe_runner.
written`), together with the file's inode and mtime at that moment. The record travels with the file
through renames (a checkpoint is written into a temp dir and moved into place), from worker processes
and from Ray tasks on other nodes alike, and costs no second read: the cache builds an entry's manifest
from these records (store/entry.record_tree) and hashes only files that have none (small JSON files, a
file system without user xattrs), or whose record no longer matches them.

A record is trusted only while the file is the one it describes: same inode, same size, same mtime_ns
(any write after the record moves mtime; a copy is a new inode). The cache removes records once the
entry's manifest holds the digests, so no other copy of the file carries one.

No torch here: the cache (warm path) reads these records.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass

XATTR = "user.recipe_runner.written"
# errnos meaning "this file system keeps no user xattrs here", not "something is wrong"
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES, errno.E2BIG,
             errno.ENOSPC, errno.EDQUOT, errno.ENOSYS, errno.EINVAL, errno.ERANGE}


@dataclass(frozen=True)
class WrittenRecord:
    """What the writer wrote into one file: its size and sha256, and the file's identity then."""

    size: int
    sha256: str
    inode: int
    mtime_ns: int

    def describes(self, st: os.stat_result) -> bool:
        """Whether `st` is still the file this record was made for, unchanged since."""
        return (st.st_size, st.st_ino, st.st_mtime_ns) == (self.size, self.inode, self.mtime_ns)


def record_written(fd: int, size: int, sha256: str) -> bool:
    """Attach the record of what was written to the open file `fd` (after its last write). False
    where the file system keeps no user xattrs: the cache then hashes the file, as before."""
    st = os.fstat(fd)
    if st.st_size != size:  # the bytes hashed are not the file's bytes: record nothing, trust nothing
        return False
    record = WrittenRecord(size, sha256, st.st_ino, st.st_mtime_ns)
    try:
        os.setxattr(fd, XATTR, json.dumps(asdict(record), sort_keys=True).encode("ascii"))
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
        return False
    return True


def written_sha256(path: str | os.PathLike, st: os.stat_result) -> str | None:
    """The sha256 recorded while `path` was written, if its record still describes the file `st`
    says it is; None when it has no record (or an unusable one): hash the file."""
    try:
        raw = os.getxattr(path, XATTR, follow_symlinks=False)
        record = WrittenRecord(**json.loads(raw))
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
        return None
    except (ValueError, TypeError):  # not ours, or from another version: hash the file
        return None
    if not (isinstance(record.sha256, str) and len(record.sha256) == 64 and record.describes(st)):
        return None
    return record.sha256


def forget_written(path: str | os.PathLike) -> None:
    """Remove the record (once the cache's manifest holds the digest); nothing if it has none."""
    try:
        os.removexattr(path, XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
