"""Lazy, validating reader over a Hugging Face model directory's weights.

Layouts, in the order they are looked for:
  1. `model.safetensors.index.json` + shards          3. `pytorch_model.bin.index.json` + shards
  2. `model.safetensors`                                4. `pytorch_model.bin`

Safetensors headers are parsed and checked first (hf.safetensors_header; cheap, no tensor data) so names, dtypes and shapes are known
up front and a truncated file is reported before anything is converted. Data is read per request
through `safe_open(...).get_slice(name)[index]` with the file opened only for that read: the
memory map is dropped right after, so reading a whole model never keeps it resident. The shard stage
maps row blocks itself (`map_rows`): a read-only view of the page cache that a cast reads straight from,
with no copy in between, unmapped as soon as the view is dropped.
"""
from __future__ import annotations

import mmap
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.config import ModelConfig
from recipe_runner.hf.files import (  # noqa: F401  (re-exported names)
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    _read_index,
    map_index,
)
from recipe_runner.hf.safetensors_header import parse_safetensors_header
from recipe_runner.hf.weights import WeightFacts, check_weights
from recipe_runner.io.safetensors_writer import CODE_TO_DTYPE, FileRange


@dataclass(frozen=True)
class TensorInfo:
    """Where a source tensor lives and what it is."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offset: int | None = None  # file offset of the first byte (safetensors only)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header (no tensor data is read; the format's rules
    are checked in hf.safetensors_header)."""
    header = parse_safetensors_header(path)
    return {name: TensorInfo(name, path, CODE_TO_DTYPE[e.dtype], e.shape, header.data_start + e.begin)
            for name, e in header.tensors.items()}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Load a .bin state dict memory-mapped (tensor data is only read when touched)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # pre-1.6 (non-zip) torch.save format cannot be mapped: load it eagerly
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / truncated archives
        raise SourceModelError(f"{path} cannot be loaded ({type(e).__name__}: {e}); "
                               "the file is corrupt or truncated — fetch it again") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise SourceModelError(f"{path} does not hold a flat state dict of tensors")
    return sd


def map_range(src: FileRange, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only tensor over the bytes of `src` (mapped from the page cache, not copied); the
    mapping goes away with the last view of it. Never write to it."""
    if src.length == 0:
        return torch.empty(shape, dtype=dtype)
    start = src.offset - src.offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(src.path, "rb", buffering=0) as f:
            window = mmap.mmap(f.fileno(), src.offset + src.length - start, prot=mmap.PROT_READ, offset=start,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except (OSError, ValueError) as e:  # ValueError: the file is shorter than its header says
        raise SourceModelError(f"{src.path}: cannot map bytes {src.offset}..{src.offset + src.length}: {e}") from None
    with warnings.catch_warnings():  # read-only on purpose: torch warns that it cannot be written
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(window, dtype=torch.uint8, count=src.length, offset=src.offset - start)
    return flat.view(dtype).view(shape)


class SourceCheckpoint:
    """Names, dtypes and shapes of a HF checkpoint's tensors; reads slices on demand."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise SourceModelError(f"{self.model_dir} is not a directory; point the source at "
                                   "a Hugging Face model directory")
        self.format, self._infos = self._discover()
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        # rows are read from several threads at once (quant/chunks.py map_row_chunks): the .bin cache is
        # swapped under this lock; safetensors reads and maps open their own file per call
        self._bin_lock = threading.Lock()
        self.files: list[Path] = sorted({i.file for i in self._infos.values()})

    # -- discovery ---------------------------------------------------------------------------

    def _discover(self) -> tuple[str, dict[str, TensorInfo]]:
        d = self.model_dir
        if (d / SAFETENSORS_INDEX).is_file():
            return "safetensors", self._from_index(d / SAFETENSORS_INDEX, self._safetensors)
        if (d / SAFETENSORS_SINGLE).is_file():
            return "safetensors", read_safetensors_header(d / SAFETENSORS_SINGLE)
        if (d / BIN_INDEX).is_file():
            return "bin", self._from_index(d / BIN_INDEX, self._bin)
        if (d / BIN_SINGLE).is_file():
            return "bin", self._bin(d / BIN_SINGLE)
        stray = sorted(p.name for p in d.glob("*.safetensors"))
        hint = (f" (found {', '.join(stray)} without {SAFETENSORS_INDEX})" if stray else "")
        raise SourceModelError(
            f"{d}: no weights found{hint}; expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} "
            f"with its shards, or {BIN_SINGLE}"
        )

    @staticmethod
    def _safetensors(path: Path) -> dict[str, TensorInfo]:
        return read_safetensors_header(path)

    @staticmethod
    def _bin(path: Path) -> dict[str, TensorInfo]:
        sd = _torch_load(path)
        return {n: TensorInfo(n, path, t.dtype, tuple(t.shape)) for n, t in sd.items()}

    @staticmethod
    def _from_index(index_path: Path, read_file) -> dict[str, TensorInfo]:
        return map_index(index_path, read_file)

    # -- queries -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise SourceModelError(f"{self.model_dir}: tensor '{name}' not found in "
                                   f"{', '.join(p.name for p in self.files)}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def validate(self, model_config: ModelConfig) -> None:
        """The decoder layers are exactly those config.json counts; every tensor `model_config` implies
        is present with the right shape and a float dtype (hf.weights.check_weights)."""
        facts = {n: WeightFacts(i.file, i.shape, str(i.dtype), i.dtype.is_floating_point)
                 for n, i in self._infos.items()}
        check_weights(self.model_dir, self.files, facts, model_config)

    # -- data --------------------------------------------------------------------------------

    def read(self, name: str, dim: int | None = None, start: int | None = None,
             stop: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, stop) slice along `dim`, as a fresh contiguous tensor."""
        info = self.info(name)
        index = [slice(None)] * len(info.shape)
        if dim is not None:
            index[dim] = slice(start, stop)
        return self.read_block(name, tuple(index))

    def read_block(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Read `tensor[index]` (basic slices only), touching only the bytes it covers."""
        info = self.info(name)
        if self.format == "safetensors":
            try:
                with safe_open(str(info.file), framework="pt") as f:
                    view = f.get_slice(name)[index] if index else f.get_tensor(name)
                    # copy out of the memory map so the mapping is released on return
                    return view.clone(memory_format=torch.contiguous_format)
            except OSError as e:
                raise SourceModelError(f"{info.file}: cannot read '{name}': {e}") from None
        with self._bin_lock:
            if self._bin_cache is None or self._bin_cache[0] != info.file:
                self._bin_cache = (info.file, _torch_load(info.file))
            state = self._bin_cache[1]
        return state[name][index].clone(memory_format=torch.contiguous_format)

    def row_range(self, name: str, start: int, stop: int) -> FileRange | None:
        """The bytes of rows [start, stop) (dim 0) as one file range, or None when the format
        does not allow addressing them directly (.bin sources)."""
        info = self.info(name)
        if info.data_offset is None:
            return None
        row_bytes = info.dtype.itemsize
        for d in info.shape[1:]:
            row_bytes *= d
        if not 0 <= start <= stop <= (info.shape[0] if info.shape else 1):
            raise ValueError(f"rows [{start}, {stop}) out of range for {name} {info.shape}")
        return FileRange(info.file, info.data_offset + start * row_bytes,
                         (stop - start) * row_bytes)

    def map_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) of a tensor of 1 or more dims as a read-only view of the file (no copy;
        see map_range), or None where the format does not allow it (.bin sources)."""
        info = self.info(name)
        rows = self.row_range(name, start, stop) if info.shape else None
        return None if rows is None else map_range(rows, info.dtype, (stop - start, *info.shape[1:]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (dim 0) without a copy where the file can be mapped, else read: read-only
        either way (copy or cast it; never write to it)."""
        mapped = self.map_rows(name, start, stop)
        return mapped if mapped is not None else self.read(name, 0, start, stop)

    def release(self) -> None:
        """Drop cached memory maps (.bin sources), so pages read so far stop counting as ours."""
        with self._bin_lock:
            self._bin_cache = None
