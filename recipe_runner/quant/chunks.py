"""Row chunks for elementwise quantization of big tensors: the float32 and integer temporaries of
one chunk stay around 64 MiB, so quantizing a 28672 x 8192 projection costs its output plus a
chunk, not several copies of the whole tensor."""
from __future__ import annotations

from typing import Iterator

CHUNK_ELEMENTS = 1 << 24


def row_slices(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))
