"""The torch side of `--device` (recipe_runner/devices.py chooses): deterministic CUDA settings for a
run, the default device of factory calls, tensors and layers moved between host and device, and the
next layer read from disk while a device runs this one (ReadAhead).

On CPU every helper is the identity (no copy, no mode pushed), so CPU results keep their bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

import torch

CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"  # what torch.use_deterministic_algorithms asks of cuBLAS >= 10.2
T = TypeVar("T")


def is_cuda(devices: Sequence[torch.device]) -> bool:
    return any(d.type == "cuda" for d in devices)


@contextlib.contextmanager
def deterministic(devices: Sequence[torch.device]) -> Iterator[None]:
    """With a CUDA device: deterministic algorithms only (an op without one raises), cuBLAS's fixed
    workspace and full float32 matmuls (no TF32), all restored afterwards. The workspace setting is read
    when cuBLAS starts in the process, so it is set before the run's first GEMM; a process that used
    cuBLAS before keeps its own. On CPU: nothing changes."""
    if not is_cuda(devices):
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.get_float32_matmul_precision(), os.environ.get(CUBLAS_WORKSPACE))
    os.environ.setdefault(CUBLAS_WORKSPACE, CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_float32_matmul_precision(before[2])
        if before[3] is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)


def default_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Factory calls without a device (torch.arange, torch.empty, ...) create on `device`; on CPU no
    mode is pushed at all."""
    return contextlib.nullcontext() if device.type == "cpu" else device


def host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory: itself on CPU; a pinned copy from CUDA (fast, asynchronous copies back)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


def move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor on `device`: tensors, modules (in place), dataclasses (copied), lists,
    tuples and dicts; anything else as it is. On CPU tensors already there are returned as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, torch.nn.Module):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: move(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def reads_ahead(devices: Sequence[torch.device], asked: bool | None) -> bool:
    """Whether to read the next layer ahead (ReadAhead): as `asked`, else on CUDA only (there the disk and
    the device work at once; on CPU the reads and the forward would share the same cores)."""
    return is_cuda(devices) if asked is None else asked


class ReadAhead(Generic[T]):
    """Items 0..count-1 of `load` (a decoder layer's tensors, read from disk), each taken once in order.
    Enabled, `take(i)` starts loading item i+1 in one background thread ("read-ahead") before it returns
    item i, so the disk reads the next layer while a device runs this one; the host then holds two
    layers' tensors at most. Disabled, `take(i)` loads item i in the calling thread (CPU: the reads and
    the forward share the same cores, and one layer in memory stays the peak).

    `load` runs in the read-ahead thread: it must not share mutable state with the caller's work (give
    it its own SourceCheckpoint). A failed load raises from the `take` of its item. The result of `load`
    is the same whether it runs ahead or not, so the bytes computed from it are too."""

    def __init__(self, load: Callable[[int], T], count: int, enabled: bool):
        self._load, self._count = load, count
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if enabled else None
        self._next: tuple[int, Future[T]] | None = None

    def take(self, index: int) -> T:
        if self._pool is None:
            return self._load(index)
        if self._next is not None and self._next[0] == index:
            future = self._next[1]
        else:
            future = self._pool.submit(self._load, index)
        self._next = (index + 1, self._pool.submit(self._load, index + 1)) if index + 1 < self._count else None
        return future.result()

    def close(self) -> None:
        """Stop: an item loading ahead is awaited (its error, if any, dropped) and freed."""
        if self._pool is not None:
            if self._next is not None:
                self._next[1].cancel()
                self._next = None
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
