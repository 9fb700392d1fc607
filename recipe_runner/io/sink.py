"""An ordered sink for one output file: bytes are written on one thread and hashed on another while
the caller produces the next block, so reading and casting, writing and hashing overlap (on all
cores: os.write, os.copy_file_range, hashlib and torch all release the GIL on large buffers).

Both threads take the blocks in the order given. A block is either bytes in memory (a memoryview the
caller must not touch until its `release` runs) or a `FileRange` of another file: the write thread
copies it inside the kernel (copy_file_range, as cp does) and the hash thread hashes the same bytes
from the page cache through a short-lived read-only mapping, so the zero-copy path still yields the
digest of exactly the bytes written. At most `depth` blocks are in flight; a block is released when
both threads are done with it. `StagingRing` lends the reusable buffers that casts are written into,
so no block allocates (and page-faults) fresh memory.

The first error of either thread is raised to the caller at its next `put` or at `finish`.

The write thread also starts the disk's writeback of what it wrote, every WRITEBACK_BYTES
(sync_file_range(SYNC_FILE_RANGE_WRITE): asynchronous, nothing waits for it). Left to itself, the
kernel writes dirty pages back only once they exceed a tenth of memory (vm.dirty_background_ratio),
so the disk would idle through the first ~2 GB of a stage and the entry's final fsync would then
wait for all of it: the CPU work and the disk's work would add up instead of overlapping.
"""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Union

import torch

if TYPE_CHECKING:
    from recipe_runner.io.safetensors_writer import FileRange

HASH_MAP_BYTES = 64 << 20  # one mapping of a copied range while it is hashed (bounds the RSS it adds)
WRITEBACK_BYTES = 32 << 20  # start the writeback of every this many bytes written
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
Data = Union[memoryview, "FileRange"]


@dataclass
class _Item:
    data: Data
    release: Callable[[], None] | None
    pending: int = 2  # the write thread and the hash thread
    lock: threading.Lock = field(default_factory=threading.Lock)


_DONE = None  # the sentinel that ends both threads


def hash_range(digest, src: "FileRange") -> None:
    """Feed the bytes of `src` to `digest`, mapped from the page cache a window at a time."""
    with open(src.path, "rb", buffering=0) as f:
        offset, end = src.offset, src.offset + src.length
        while offset < end:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            length = min(end, start + HASH_MAP_BYTES) - start
            with mmap.mmap(f.fileno(), length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=start) as window:
                with memoryview(window) as view:
                    digest.update(view[offset - start:])
            offset = start + length


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none. Looked up among the symbols the
    process has already loaded (CDLL(None)): ctypes.util.find_library would run ldconfig at import."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset + length) of `fd` to disk, without waiting.
    Only a hint: where it is unsupported, or fails, the entry's fsync still makes the bytes durable."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class HashingSink:
    """Writes blocks to `file` in order and hashes them (sha256) in the same order, off this thread."""

    def __init__(self, file: BinaryIO, write: Callable[[BinaryIO, memoryview], None],
                 copy: Callable[[BinaryIO, "FileRange"], None], depth: int = 3):
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0
        self._write, self._copy = write, copy
        self._kicked_at = 0  # the file offset writeback was started up to
        self._slots = threading.Semaphore(depth)
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue(), queue.SimpleQueue()]
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, args=(q, work), daemon=True,
                                          name=f"sink-{kind}")
                         for q, work, kind in zip(self._queues, (self._write_one, self._hash_one),
                                                  ("write", "hash"))]
        for t in self._threads:
            t.start()

    def put(self, data: Data, release: Callable[[], None] | None = None) -> None:
        """Queue `data` after everything queued so far (blocks while `depth` blocks are in flight)."""
        self._raise_error()
        self._slots.acquire()
        self.size += data.nbytes if isinstance(data, memoryview) else data.length
        item = _Item(data, release)
        for q in self._queues:
            q.put(item)

    def finish(self) -> str:
        """Wait until every block is written and hashed; the sha256 of all of them (hex)."""
        self._stop()
        self._raise_error()
        return self.digest.hexdigest()

    def abort(self) -> None:
        """Stop after the blocks in flight (dropped, not written); never raises their errors."""
        if self._error is None:
            self._error = RuntimeError("aborted")
        self._stop()

    # -- the threads --------------------------------------------------------------------------

    def _stop(self) -> None:
        if self._threads:
            for q in self._queues:
                q.put(_DONE)
            for t in self._threads:
                t.join()
            self._threads = []

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self, q: queue.SimpleQueue, work: Callable[[Data], None]) -> None:
        while (item := q.get()) is not _DONE:
            try:
                if self._error is None:  # after an error, blocks are only released
                    work(item.data)
            except BaseException as exc:  # handed to the caller's thread
                if self._error is None:
                    self._error = exc
            finally:
                self._done(item)

    def _write_one(self, data: Data) -> None:
        if isinstance(data, memoryview):
            self._write(self.file, data)
        else:
            self._copy(self.file, data)
        end = os.lseek(self.file.fileno(), 0, os.SEEK_CUR)  # the sink appends: the file's end so far
        if end - self._kicked_at >= WRITEBACK_BYTES:
            start_writeback(self.file.fileno(), self._kicked_at, end - self._kicked_at)
            self._kicked_at = end

    def _hash_one(self, data: Data) -> None:
        if isinstance(data, memoryview):
            self.digest.update(data)
        else:
            hash_range(self.digest, data)

    def _done(self, item: _Item) -> None:
        with item.lock:
            item.pending -= 1
            last = item.pending == 0
        if last:
            item.data = memoryview(b"")  # drop the reference to the block's memory now
            if item.release is not None:
                item.release()
            self._slots.release()


class StagingRing:
    """Reusable output buffers of `nbytes` each: a block is cast into one, and the buffer comes back
    when the sink is done with it. Never waits: the sink's `depth` already bounds the blocks in
    flight, so at most depth + 1 buffers live; one not given back is simply freed (larger requests
    get a buffer of their own)."""

    def __init__(self, count: int, nbytes: int):
        self.count, self.nbytes = count, nbytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[], None]]:
        """A tensor of `shape` and `dtype` in a free buffer, and the function that gives it back."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if nbytes > self.nbytes:
            return torch.empty(shape, dtype=dtype), lambda: None
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape), lambda: self._give_back(buffer)

    def _give_back(self, buffer: torch.Tensor) -> None:
        if self._free.qsize() < self.count:
            self._free.put(buffer)
