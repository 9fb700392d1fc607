"""The shard planner's result: a JSON-serializable, in-memory plan of every rank's tensors.

Source expressions (all concatenation is along dim 0, i.e. row blocks):
  Read(tensor, dim, start, stop)  HF `tensor[start:stop]` along `dim` (whole tensor if dim None)
  Zeros(shape)                    zero padding (vocabulary rows added for tensor parallelism)
  Concat(parts)                   parts stacked along dim 0 (fused qkv, padded vocab)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

import torch

MANIFEST_FORMAT = "recipe-runner/convert-manifest/1"


@dataclass(frozen=True)
class Read:
    """`tensor[start:stop]` along `dim` of a source tensor; the whole tensor when dim is None."""

    tensor: str
    dim: int | None = None
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class Zeros:
    """A block of zeros (padding rows)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Concat:
    """Parts stacked along dim 0."""

    parts: tuple[Union[Read, Zeros], ...]


Source = Union[Read, Zeros, Concat]


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, shape and dtype, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float16"
    source: Source
    note: str = ""  # human-readable explanation of non-obvious transforms

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class RankPlan:
    """Everything rank{rank}.safetensors holds."""

    rank: int
    tp_rank: int
    pp_rank: int
    layers: tuple[int, ...]  # global layer indices, stored as local 0..n-1
    tensors: tuple[TensorPlan, ...]

    @property
    def file_name(self) -> str:
        return f"rank{self.rank}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class SourceTensor:
    """A source tensor as it was when the manifest was planned."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ConvertManifest:
    """The whole conversion: config.json content, source tensors used, per-rank plans."""

    config: dict[str, Any] = field(hash=False)
    source: dict[str, SourceTensor] = field(hash=False)
    ranks: tuple[RankPlan, ...]
    format: str = MANIFEST_FORMAT

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def nbytes(self) -> int:
        """Tensor bytes of the whole checkpoint (headers excluded)."""
        return sum(r.nbytes for r in self.ranks)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, no whitespace variation)."""
        return json.dumps(_to_plain(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ConvertManifest":
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest: format={data.get('format')!r}")
        return cls(
            config=data["config"],
            source={n: SourceTensor(s["dtype"], tuple(s["shape"]))
                    for n, s in data["source"].items()},
            ranks=tuple(_rank_from_plain(r) for r in data["ranks"]),
            format=data["format"],
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _source_to_plain(src: Source) -> dict[str, Any]:
    if isinstance(src, Read):
        return {"op": "read", "tensor": src.tensor, "dim": src.dim, "start": src.start,
                "stop": src.stop}
    if isinstance(src, Zeros):
        return {"op": "zeros", "shape": list(src.shape)}
    return {"op": "concat", "parts": [_source_to_plain(p) for p in src.parts]}


def _source_from_plain(d: dict[str, Any]) -> Source:
    op = d["op"]
    if op == "read":
        return Read(d["tensor"], d["dim"], d["start"], d["stop"])
    if op == "zeros":
        return Zeros(tuple(d["shape"]))
    if op == "concat":
        return Concat(tuple(_source_from_plain(p) for p in d["parts"]))  # type: ignore[misc]
    raise ValueError(f"unknown source op {op!r}")


def _to_plain(m: ConvertManifest) -> dict[str, Any]:
    return {
        "format": m.format,
        "config": m.config,
        "source": {n: {"dtype": s.dtype, "shape": list(s.shape)} for n, s in m.source.items()},
        "ranks": [
            {"rank": r.rank, "tp_rank": r.tp_rank, "pp_rank": r.pp_rank, "layers": list(r.layers),
             "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                          "source": _source_to_plain(t.source), "note": t.note}
                         for t in r.tensors]}
            for r in m.ranks
        ],
    }


def _rank_from_plain(r: dict[str, Any]) -> RankPlan:
    return RankPlan(
        rank=r["rank"], tp_rank=r["tp_rank"], pp_rank=r["pp_rank"], layers=tuple(r["layers"]),
        tensors=tuple(TensorPlan(t["name"], tuple(t["shape"]), t["dtype"],
                                 _source_from_plain(t["source"]), t.get("note", ""))
                      for t in r["tensors"]),
    )


def source_shape(src: Source, source_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape `src` evaluates to, given the source tensors' shapes."""
    if isinstance(src, Zeros):
        return src.shape
    if isinstance(src, Read):
        shape = list(source_shapes[src.tensor])
        if src.dim is not None:
            start, stop, _ = slice(src.start, src.stop).indices(shape[src.dim])
            shape[src.dim] = max(stop - start, 0)
        return tuple(shape)
    shapes = [source_shape(p, source_shapes) for p in src.parts]
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"concat parts disagree beyond dim 0: {shapes}")
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def source_tensors_of(src: Source) -> list[str]:
    if isinstance(src, Read):
        return [src.tensor]
    if isinstance(src, Concat):
        return [n for p in src.parts for n in source_tensors_of(p)]
    return []
