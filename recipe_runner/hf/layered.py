"""Several checkpoint directories read as one: the quantize stage's tensors next to the HF source.

Names must be distinct across the layers (the artifact never shadows a source tensor), so which
directory a tensor comes from is never ambiguous. The interface is SourceCheckpoint's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch

from recipe_runner.hf.config import ModelConfig
from recipe_runner.hf.reader import SourceCheckpoint, TensorInfo
from recipe_runner.io.safetensors_writer import FileRange

CheckpointDirs = Union[str, Path, Sequence[Union[str, Path]]]


class LayeredCheckpoint:
    """`extras` (e.g. quantized tensors) over `base` (the HF source, which `validate` checks)."""

    def __init__(self, base: SourceCheckpoint, extras: Sequence[SourceCheckpoint]):
        self.base = base
        self.parts = [base, *extras]
        self._owner: dict[str, SourceCheckpoint] = {}
        for part in self.parts:
            for name in part.names():
                if name in self._owner:
                    raise ValueError(f"tensor {name!r} is in both {self._owner[name].model_dir} and {part.model_dir}")
                self._owner[name] = part
        self.files = sorted({f for p in self.parts for f in p.files})
        self.model_dir = base.model_dir

    def _part(self, name: str) -> SourceCheckpoint:
        return self._owner.get(name, self.base)  # the base raises its own "not found" error

    def names(self) -> list[str]:
        return sorted(self._owner)

    def __contains__(self, name: str) -> bool:
        return name in self._owner

    def info(self, name: str) -> TensorInfo:
        return self._part(name).info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._part(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._part(name).dtype(name)

    def validate(self, model_config: ModelConfig) -> None:
        self.base.validate(model_config)

    def read(self, name: str, dim: int | None = None, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        return self._part(name).read(name, dim, start, stop)

    def read_block(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._part(name).read_block(name, index)

    def row_range(self, name: str, start: int, stop: int) -> FileRange | None:
        return self._part(name).row_range(name, start, stop)

    def map_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        return self._part(name).map_rows(name, start, stop)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._part(name).rows(name, start, stop)

    def release(self) -> None:
        for part in self.parts:
            part.release()


def open_checkpoint(dirs: CheckpointDirs) -> SourceCheckpoint | LayeredCheckpoint:
    """One directory: its SourceCheckpoint; several: the last is the HF source, the others lie over it."""
    if isinstance(dirs, (str, Path)):
        return SourceCheckpoint(dirs)
    *extras, base = [Path(d) for d in dirs]
    if not extras:
        return SourceCheckpoint(base)
    return LayeredCheckpoint(SourceCheckpoint(base), [SourceCheckpoint(d) for d in extras])
