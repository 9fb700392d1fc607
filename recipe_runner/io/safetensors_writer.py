"""Streaming safetensors writer: the header is fixed before any data, then tensors (or row
blocks of tensors) are appended one at a time, so peak memory is one block, not one file.

The layout mirrors `safetensors.torch.save_file` (tensors ordered by dtype, widest first, then
by name; compact JSON header padded with spaces to 8 bytes; no metadata unless given), so the
bytes are identical to what the reference library writes for the same tensors and loaders see
aligned data. Nothing time- or path-dependent goes into the file.

Bytes are written and hashed as they go (io/sink.py: a write thread and a hash thread behind the
caller), and the finished file carries the record of its size and sha256 (io/written.py), so a cache
entry's manifest needs no second read of it. Blocks cast into `staging` buffers reuse memory.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

from recipe_runner.io.sink import HashingSink, StagingRing
from recipe_runner.io.written import record_written

# safetensors dtype codes, in the order of the Rust `Dtype` enum (save_file sorts by it, widest
# alignment last; we sort descending, as it does).
_DTYPE_ORDER: list[tuple[torch.dtype, str]] = [
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
]
DTYPE_TO_CODE: dict[torch.dtype, str] = dict(_DTYPE_ORDER)
CODE_TO_DTYPE: dict[str, torch.dtype] = {code: dt for dt, code in _DTYPE_ORDER}
_DTYPE_RANK: dict[torch.dtype, int] = {dt: i for i, (dt, _) in enumerate(_DTYPE_ORDER)}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """Where every tensor goes: header bytes (with the 8-byte length prefix) and data order."""

    prefix: bytes
    order: tuple[TensorSpec, ...]
    offsets: Mapping[str, tuple[int, int]]  # relative to the start of the data section
    data_size: int

    @property
    def file_size(self) -> int:
        return len(self.prefix) + self.data_size


def plan_layout(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None,
                keep_order: bool = False) -> Layout:
    """Compute the header and data order for `specs` (names must be unique): save_file's order, or
    with `keep_order` the order given (readers locate tensors by their offsets, so both load)."""
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names: " + ", ".join(sorted(
            {n for n in names if names.count(n) > 1})))
    for s in specs:
        if s.dtype not in DTYPE_TO_CODE:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
    order = specs if keep_order else sorted(specs, key=lambda s: (-_DTYPE_RANK[s.dtype], s.name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for s in order:
        offsets[s.name] = (pos, pos + s.nbytes)
        header[s.name] = {"dtype": DTYPE_TO_CODE[s.dtype], "shape": list(s.shape),
                          "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return Layout(struct.pack("<Q", len(blob)) + blob, tuple(order), offsets, pos)


@dataclass(frozen=True)
class FileRange:
    """`length` bytes at `offset` of another file, to be copied verbatim (zero-copy path)."""

    path: Path
    offset: int
    length: int

    @property
    def nbytes(self) -> int:
        return self.length


Block = Union[torch.Tensor, FileRange]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes without an extra copy when already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    """Write every byte of `data` to the unbuffered file `f` (tests inject ENOSPC here)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


STAGING_BYTES = 64 << 20  # one reusable output buffer (shard.DEFAULT_BLOCK_BYTES blocks fit)
# A kernel copy goes to the sink in pieces this large, so the hash thread reads each piece from the
# page cache while the copy has just brought it into the CPU caches, a few pieces behind at most.
COPY_PIECE_BYTES = 8 << 20


# errnos meaning "copy_file_range cannot do this pair of files", not "the copy failed"
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _pieces(src: FileRange, size: int) -> Iterator[FileRange]:
    """`src` in consecutive ranges of at most `size` bytes."""
    for offset in range(src.offset, src.offset + src.length, size):
        yield FileRange(src.path, offset, min(size, src.offset + src.length - offset))
    if src.length == 0:
        yield src


def _check_range(src: FileRange) -> None:
    """Refuse a range past the end of its file now, not later on the write thread."""
    size = os.stat(src.path).st_size
    if src.offset + src.length > size:
        raise OSError(errno.EIO, f"{src.path} ended before byte {src.offset + src.length} (it has {size})")


def _copy_range(f: BinaryIO, src: FileRange) -> None:
    """Append `src` to `f` inside the kernel (os.copy_file_range, like cp), falling back to
    pread + write where the kernel or file systems cannot (tests inject ENOSPC here too)."""
    fd_in = os.open(src.path, os.O_RDONLY)
    try:
        offset, left = src.offset, src.length
        use_kernel = hasattr(os, "copy_file_range")
        while left:
            if use_kernel:
                try:
                    n = os.copy_file_range(fd_in, f.fileno(), left, offset)
                except OSError as e:
                    if e.errno not in _NO_COPY_RANGE:
                        raise
                    n = 0
                if n == 0:  # unsupported here (some file systems just copy nothing)
                    use_kernel = False
                    continue
            else:
                chunk = os.pread(fd_in, min(left, 16 * 1024 * 1024), offset)
                n = len(chunk)
                if n:
                    _write_all(f, chunk)
            if n == 0:
                raise OSError(errno.EIO, f"{src.path} ended before byte {offset + left}")
            offset += n
            left -= n
    finally:
        os.close(fd_in)


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor, in `layout.order`.

    The file is written as `<path>.partial` and renamed to `path` only by a successful
    `close()`; `abort()` (or leaving the `with` block by an exception) deletes the partial file.
    After `close()`, `sha256` and `size` describe the bytes written (also recorded on the file).
    """

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec],
                 metadata: Mapping[str, str] | None = None, keep_order: bool = False):
        self.path = Path(path)
        self.layout = plan_layout(specs, metadata, keep_order)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.sha256: str | None = None
        self._next = 0  # index into layout.order of the tensor to write next
        self._ring = StagingRing(2, STAGING_BYTES)
        self._lent: dict[int, Callable[[], None]] = {}  # data_ptr of a lent staging tensor -> its give-back
        # unbuffered: large blocks go straight to the kernel, and os.copy_file_range can
        # append at the descriptor's position without a user-space buffer in between
        self._file: BinaryIO | None = open(self.partial_path, "wb", buffering=0)
        # the module's functions as they are now (tests replace them to fill the disk)
        self._sink = HashingSink(self._file, _write_all, _copy_range)
        try:
            self._sink.put(memoryview(self.layout.prefix))
        except BaseException:
            self.abort()
            raise

    @property
    def size(self) -> int:
        return self.layout.file_size

    @property
    def pending(self) -> list[str]:
        """Names still to write, in the order they must be written."""
        return [s.name for s in self.layout.order[self._next:]]

    def staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An output tensor to fill and then pass as a block: its memory is reused once written."""
        tensor, give_back = self._ring.take(tuple(shape), dtype)
        self._lent[tensor.data_ptr()] = give_back
        return tensor

    def _expect(self, name: str) -> TensorSpec:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next >= len(self.layout.order):
            raise ValueError(f"{self.path}: unexpected tensor {name}; all tensors written")
        spec = self.layout.order[self._next]
        if spec.name != name:
            raise ValueError(f"{self.path}: expected tensor {spec.name} next, got {name}")
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (it must be the next one in layout order)."""
        spec = self._expect(name)
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != planned {spec.shape}")
        self.write_blocks(name, [tensor])

    def write_blocks(self, name: str, blocks: Iterable[Block]) -> None:
        """Write the next tensor as consecutive row blocks (their bytes concatenated).

        A block is a tensor of the planned dtype, or a FileRange holding bytes already in that
        dtype (copied without passing through this process). A tensor must not change until the
        writer is closed, unless it came from `staging`.
        """
        spec = self._expect(name)
        written = 0
        for block in blocks:
            if isinstance(block, torch.Tensor) and block.dtype != spec.dtype:
                raise ValueError(f"{name}: block dtype {block.dtype} != planned {spec.dtype}")
            data = tensor_bytes(block) if isinstance(block, torch.Tensor) else block
            written += data.nbytes
            if written > spec.nbytes:
                raise ValueError(f"{name}: more bytes than its planned shape {spec.shape}")
            if isinstance(data, FileRange):
                _check_range(data)
                for piece in _pieces(data, COPY_PIECE_BYTES):
                    self._sink.put(piece)
                continue
            self._sink.put(data, self._lent.pop(block.data_ptr(), None))
        if written != spec.nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, planned {spec.nbytes}")
        self._next += 1

    def close(self) -> Path:
        """Finish the file and move it to its final name; every tensor must have been written."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next != len(self.layout.order):
            missing = self.pending
            self.abort()
            raise ValueError(f"{self.path}: not all tensors written (missing {missing[:3]}…)")
        try:
            self.sha256 = self._sink.finish()
            record_written(self._file.fileno(), self._sink.size, self.sha256)
            self._file.close()
        except BaseException:
            self.abort()
            raise
        self._file = None
        os.replace(self.partial_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file; safe to call more than once."""
        self._sink.abort()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # e.g. ENOSPC while flushing: the file is being deleted anyway
            self._file = None
        self.partial_path.unlink(missing_ok=True)

    def __del__(self) -> None:
        # dropped without close() or abort(): stop the sink's threads, leave no partial file
        if getattr(self, "_file", None) is not None:
            self.abort()

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Convenience: write an in-memory dict through the streaming writer."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsStreamWriter(path, specs, metadata) as w:
        for spec in w.layout.order:
            w.write(spec.name, tensors[spec.name])
    return Path(path)
