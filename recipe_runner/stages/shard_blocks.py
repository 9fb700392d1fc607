"""The bytes of one planned rank tensor, as row blocks in file order (the shard stage writes them).

A part that is a plain byte copy of the source (a whole tensor or a row slice, already in the output
dtype) is a FileRange: the kernel copies it, as cp does. Every other part (a cast, a column slice,
zero padding) is produced a block of at most `max_block_bytes` at a time: the block's source rows are
mapped read-only from the page cache (SourceCheckpoint.map_rows; .bin sources are read), and one
`copy_` casts and gathers them into an output buffer, on torch's intra-op threads. With `staging`
(the writer's) that buffer is reused once written, so no block allocates fresh memory.

float16 cannot hold what bfloat16 and float32 can: a cast to it that would turn a finite value into an
infinity is refused. The check reads the block once (aminmax); only a block whose range reaches past
float16's (or holds NaNs) is checked exactly, infinity by infinity, as before.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from recipe_runner.errors import UserError
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.io.safetensors_writer import Block, FileRange
from recipe_runner.stages.manifest import Concat, Read, Source, TensorPlan, Zeros

# Small enough that a block cast into its buffer is still in the CPU caches when the sink's threads
# hash and write it (64 MiB blocks went through memory three times: ~30% more CPU on 2 cores here).
DEFAULT_BLOCK_BYTES = 4 * 1024 * 1024
FLOAT16_MAX = 65504.0
Staging = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # an output buffer of shape, dtype


@contextmanager
def cast_threads(count: int = 1) -> Iterator[None]:
    """torch's intra-op threads while a rank file is written: one. The writer already keeps two cores
    busy (cast | write | hash on three threads, and rank processes beside it); torch's pool on top
    only oversubscribes them, its threads spinning at every barrier while the others wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _row_blocks(rows: int, row_bytes: int, max_block_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, max_block_bytes // max(row_bytes, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _read_blocks(src: Read, reader: SourceCheckpoint, max_block_bytes: int) -> Iterator[torch.Tensor]:
    """Row blocks of `src` in its source dtype: views of the mapped file where it can be mapped (never
    written to), else fresh reads."""
    shape = reader.shape(src.tensor)
    if not shape:
        yield reader.read(src.tensor)
        return
    index = [slice(None)] * len(shape)
    if src.dim is not None:
        index[src.dim] = slice(src.start, src.stop)
    r_start, r_stop, _ = index[0].indices(shape[0])
    inner = tuple(index[1:])
    # a row block of a column slice still touches whole source rows: size blocks by those
    src_row_bytes = reader.dtype(src.tensor).itemsize * _numel(shape[1:])
    blocks = _row_blocks(r_stop - r_start, src_row_bytes, max_block_bytes) if len(shape) > 1 else [(0, r_stop - r_start)]
    for r0, r1 in blocks:
        rows = (r_start + r0, r_start + r1)
        mapped = reader.map_rows(src.tensor, *rows)
        if mapped is None:
            yield reader.read_block(src.tensor, (slice(*rows), *inner))
        else:
            yield mapped[(slice(None), *inner)]


def iter_source_blocks(src: Source, reader: SourceCheckpoint, dtype: torch.dtype,
                       max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """Row blocks (dim 0) whose concatenation is `src`; Zeros come out in `dtype`, reads in their
    source dtype (read-only views: copy before changing them)."""
    if isinstance(src, Zeros):
        row_bytes = _numel(src.shape[1:]) * dtype.itemsize
        for r0, r1 in _row_blocks(src.shape[0], row_bytes, max_block_bytes):
            yield torch.zeros((r1 - r0, *src.shape[1:]), dtype=dtype)
    elif isinstance(src, Read):
        yield from _read_blocks(src, reader, max_block_bytes)
    else:
        for part in src.parts:
            yield from iter_source_blocks(part, reader, dtype, max_block_bytes)


def _zero_copy(src: Source, reader: SourceCheckpoint, dtype: torch.dtype) -> FileRange | None:
    """`src` as a byte range of a source file when it needs no transform at all: a whole tensor
    or a row slice, already in the output dtype. Copied by the kernel, like cp."""
    if not isinstance(src, Read) or reader.dtype(src.tensor) != dtype:
        return None
    shape = reader.shape(src.tensor)
    start, stop = 0, (shape[0] if shape else 1)
    if src.dim == 0:
        start, stop, _ = slice(src.start, src.stop).indices(shape[0])
    elif src.dim is not None:  # a slice of an inner dim is contiguous only when it is all of it
        if slice(src.start, src.stop).indices(shape[src.dim])[:2] != (0, shape[src.dim]):
            return None
    return reader.row_range(src.tensor, start, stop)


def is_byte_copy(plan: TensorPlan, reader: SourceCheckpoint) -> bool:
    """Whether every part of `plan` is a plain byte range of the source (kernel-copied: nothing computed)."""
    dtype = getattr(torch, plan.dtype)
    parts = plan.source.parts if isinstance(plan.source, Concat) else (plan.source,)
    return all(_zero_copy(part, reader, dtype) is not None for part in parts)


def iter_output_blocks(plan: TensorPlan, reader: SourceCheckpoint,
                       max_block_bytes: int = DEFAULT_BLOCK_BYTES, *, zero_copy: bool = True,
                       staging: Staging | None = None) -> Iterator[Block]:
    """The bytes of `plan`, in order: tensors in the output dtype (in `staging` buffers when given:
    each is only valid until the writer has written it), or (zero_copy) file ranges for parts that
    are plain byte copies of the source."""
    dtype = getattr(torch, plan.dtype)
    out = staging or _fresh
    parts = plan.source.parts if isinstance(plan.source, Concat) else (plan.source,)
    for part in parts:
        direct = _zero_copy(part, reader, dtype) if zero_copy else None
        if direct is not None:
            yield direct
            continue
        for block in iter_source_blocks(part, reader, dtype, max_block_bytes):
            yield convert_block(block, dtype, plan.name, out)


def convert_block(block: torch.Tensor, dtype: torch.dtype, name: str, staging: Staging = _fresh) -> torch.Tensor:
    """`block` in `dtype`, written into a `staging` buffer (one pass: cast and gather at once)."""
    if dtype == torch.float16 and block.dtype != dtype:
        _refuse_float16_overflow(block, name)
    out = staging(tuple(block.shape), dtype)
    out.copy_(block)
    return out


def _refuse_float16_overflow(block: torch.Tensor, name: str) -> None:
    """float16 has a smaller range than bfloat16/float32: refuse silent infinities."""
    if block.numel() == 0:
        return
    if block.is_floating_point():
        low, high = torch.aminmax(block)
        if -FLOAT16_MAX <= float(low) and float(high) <= FLOAT16_MAX:  # False for NaN: checked exactly below
            return
    if torch.isinf(block.to(torch.float16)).sum() > torch.isinf(block).sum():
        peak = block.abs().max().item()
        raise UserError(f"tensor {name}: values up to {peak:.4g} overflow float16 (max 65504); "
                        "convert with dtype bfloat16 or float32")
