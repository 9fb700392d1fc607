"""Row chunks for elementwise quantization of big tensors, and a pool that runs them on every core.

Two chunk sizes:
  CHUNK_ELEMENTS (64 MiB of float32) bounds memory where chunks run one after another: row_slices'
    default, sq_search's error sums (their float partial-sum order follows these chunks, so their
    values depend on them) and tensors on a GPU. A 28672 x 8192 projection costs its output plus a
    chunk, not several copies of the whole tensor.
  CODE_ELEMENTS (4 MiB of float32) is what map_row_chunks hands out: cache-sized, so the passes of one
    elementwise formula over a chunk (quotient, rounding, clamp, cast) run from the core's caches
    instead of going through memory once per pass.

map_row_chunks(fn, rows, cols) calls fn(rows_slice) once per chunk on a module-level pool of one thread
per core. Every fn writes only its own rows of a preallocated output (or a partial result per chunk that
an order-independent reduction such as max combines), so the result is byte-identical to a sequential
loop over the same chunks, whatever order the threads take them in.

While the pool runs, torch's intra-op threads are set to 1: the pool already keeps every core busy, and
intra-op (OpenMP) threads on top of it only oversubscribe the cores, spinning at every barrier while
the pool's threads wait for a core (on few cores, several times slower than either alone).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Callable, Iterator

import torch

if TYPE_CHECKING:
    from recipe_runner.hf.reader import SourceCheckpoint

CHUNK_ELEMENTS = 1 << 24
CODE_ELEMENTS = 1 << 20
THREAD_PREFIX = "quant-chunk"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_threads_lock = threading.Lock()  # guards _active and _saved_threads (callers from several threads)
_active = 0  # map_row_chunks calls running their pool now
_saved_threads = 1  # torch's intra-op threads before the first of them set 1
_local = threading.local()  # .worker: this thread is one of the pool's


def row_slices(rows: int, cols: int, elements: int | None = None) -> Iterator[slice]:
    """Consecutive row ranges of about `elements` (default CHUNK_ELEMENTS, read at call time) elements."""
    step = max(1, (CHUNK_ELEMENTS if elements is None else elements) // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def cores() -> int:
    return os.cpu_count() or 1


def map_row_chunks(fn: Callable[[slice], None], rows: int, cols: int, device: torch.device | str | None = None
                   ) -> None:
    """fn(s) for every s of row_slices(rows, cols, CODE_ELEMENTS), on the pool (one thread per core). After
    an exception the chunks not yet started are cancelled, and once every started one has finished the
    first exception in row order among them propagates. Runs in the calling thread, one chunk after another, for a tensor on a non-CPU `device`
    (with CHUNK_ELEMENTS chunks: the GPU parallelizes each one), for a call made by fn itself (a pool
    thread waiting on the pool could deadlock it), on one core, and when there is only one chunk."""
    if device is not None and torch.device(device).type != "cpu":
        for s in row_slices(rows, cols):
            fn(s)
        return
    slices = list(row_slices(rows, cols, CODE_ELEMENTS))
    if len(slices) <= 1 or cores() <= 1 or getattr(_local, "worker", False):
        for s in slices:
            fn(s)
        return
    _enter()
    try:
        futures = [_get_pool().submit(_run, fn, s) for s in slices]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # after an error (or an interrupt here) start no more chunks; never leave one running
            for f in futures:
                f.cancel()
            wait(futures)
    finally:
        _leave()
    _raise_first(futures)


def cast_rows(reader: SourceCheckpoint, name: str, dtype: torch.dtype,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Source matrix `name` rounded to `dtype` (the model dtype), stored as `out_dtype`: cast row chunk by
    row chunk on every core straight from the source (each chunk mapped on its own and unmapped once cast:
    a map of the whole tensor would count its pages in our peak RSS; no copy in between)."""
    rows, cols = reader.shape(name)
    out = torch.empty((rows, cols), dtype=out_dtype)

    def cast(chunk: slice) -> None:
        out[chunk] = reader.rows(name, chunk.start, chunk.stop).to(dtype)

    map_row_chunks(cast, rows, cols)
    reader.release()
    return out


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of `shape` reused by this thread under `name` (one per caller of it: a function's chunk
    temporaries), so chunks do not fault in fresh memory: a chunk's buffer is larger than what malloc
    keeps for reuse. Only CPU buffers up to 2 x CODE_ELEMENTS are kept (a GPU's allocator caches on its
    own; a bigger one is a one-row chunk of a very wide tensor, not worth holding on to)."""
    if torch.device(device).type != "cpu" or math.prod(shape) > 2 * CODE_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype:
        buf = buffers[name] = torch.empty(0, dtype=dtype)
    return buf.resize_(shape)


def _raise_first(futures: list[Future]) -> None:
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()


def _run(fn: Callable[[slice], None], s: slice) -> None:
    if not getattr(_local, "worker", False):
        _local.worker = True
        # get first: torch initializes a thread's intra-op count lazily, from the process-wide value, at
        # its first parallel op; after that this thread keeps 1 whatever other threads set.
        torch.get_num_threads()
        torch.set_num_threads(1)
    fn(s)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cores(), thread_name_prefix=THREAD_PREFIX)
        return _pool


def _enter() -> None:
    """torch's intra-op threads to 1 in this thread (and as the process-wide value new threads start
    from); counted, so that concurrent callers in other threads leave it at 1 until the last one is done."""
    global _active, _saved_threads
    with _threads_lock:
        if _active == 0:
            _saved_threads = torch.get_num_threads()
        _active += 1
        torch.set_num_threads(1)


def _leave() -> None:
    """This thread back to the count before the first concurrent call. torch.set_num_threads also sets
    the process-wide value while other calls still run: harmless, their pool threads set 1 for
    themselves (_run), and the last call to finish leaves the value as it found it."""
    global _active
    with _threads_lock:
        _active -= 1
        torch.set_num_threads(_saved_threads)


def _after_fork() -> None:
    """A forked child has none of the pool's threads: start from a fresh pool (and counts) there."""
    global _pool, _pool_lock, _threads_lock, _active
    _pool, _pool_lock, _threads_lock, _active = None, threading.Lock(), threading.Lock(), 0


os.register_at_fork(after_in_child=_after_fork)
