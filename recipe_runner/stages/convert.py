"""Convert stage: plan every TensorRT-LLM tensor of every rank as lazy reads of the HF source.

The result, a `ConvertManifest`, is small and JSON-serializable; it is the convert stage's cached
artifact. No tensor is materialized here: each planned tensor says which HF tensor(s) to read,
which rows/columns, where zero padding goes and how the pieces are concatenated. The shard stage
executes it.

Source expressions (all concatenation is along dim 0, i.e. row blocks):
  Read(tensor, dim, start, stop)  HF `tensor[start:stop]` along `dim` (whole tensor if dim None)
  Zeros(shape)                    zero padding (vocabulary rows added for tensor parallelism)
  Concat(parts)                   parts stacked along dim 0 (fused qkv, padded vocab)
KV-head duplication needs no operation of its own: a rank holding a duplicated head reads that
head's rows, so several ranks read the same rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import torch

from recipe_runner.errors import UserError
from recipe_runner.hf import names as hf
from recipe_runner.hf.config import ModelConfig, read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.trtllm import names as tl
from recipe_runner.trtllm.config import build_checkpoint_config, resolve_dtype
from recipe_runner.trtllm.mapping import all_ranks, check_mapping, pp_layers
from recipe_runner.trtllm.sharding import (
    kv_heads_for_rank,
    q_heads_for_rank,
    split_range,
    vocab_rows_for_rank,
)

MANIFEST_FORMAT = "recipe-runner/convert-manifest/1"


# ---- manifest data model -------------------------------------------------------------------


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


# ---- planning --------------------------------------------------------------------------------


class TensorSource(Protocol):
    """What planning needs from a source checkpoint (SourceCheckpoint satisfies it)."""

    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...


@dataclass(frozen=True)
class _Ctx:
    cfg: ModelConfig
    dtype: str
    tp: int
    tp_rank: int
    use_parallel_embedding: bool
    embedding_sharding_dim: int


def _rows(tensor: str, start: int, stop: int) -> Read:
    return Read(tensor, 0, start, stop)


def _padded_vocab_rows(c: _Ctx, tensor: str) -> tuple[Source, str]:
    """This rank's block of a vocabulary-row-split tensor, zero-padded to ceil(V/tp) rows."""
    rows = vocab_rows_for_rank(c.cfg.vocab_size, c.tp, c.tp_rank)
    parts: list[Union[Read, Zeros]] = []
    if rows.stop > rows.start:
        parts.append(_rows(tensor, rows.start, rows.stop))
    if rows.pad_rows:
        parts.append(Zeros((rows.pad_rows, c.cfg.hidden_size)))
    note = (f"vocab rows {rows.start}..{rows.stop - 1} + {rows.pad_rows} zero rows"
            if rows.pad_rows else "")
    src: Source = parts[0] if len(parts) == 1 else Concat(tuple(parts))
    return src, note


def _embedding(c: _Ctx) -> TensorPlan:
    V, H = c.cfg.vocab_size, c.cfg.hidden_size
    if not c.use_parallel_embedding:
        return TensorPlan(tl.VOCAB_EMBEDDING, (V, H), c.dtype, Read(hf.EMBED_TOKENS))
    if c.embedding_sharding_dim == 0:
        src, note = _padded_vocab_rows(c, hf.EMBED_TOKENS)
        rows = vocab_rows_for_rank(V, c.tp, c.tp_rank).total
        return TensorPlan(tl.VOCAB_EMBEDDING, (rows, H), c.dtype, src, note)
    start, stop = split_range(H, c.tp, c.tp_rank)
    return TensorPlan(tl.VOCAB_EMBEDDING, (V, stop - start), c.dtype,
                      Read(hf.EMBED_TOKENS, 1, start, stop))


def _lm_head(c: _Ctx) -> TensorPlan:
    # Tied models use the embedding as lm_head (HF semantics); it is written as its own tensor.
    tensor = hf.EMBED_TOKENS if c.cfg.tie_word_embeddings else hf.LM_HEAD
    src, note = _padded_vocab_rows(c, tensor)
    if c.cfg.tie_word_embeddings:
        note = "tied: from embed_tokens" + (f"; {note}" if note else "")
    rows = vocab_rows_for_rank(c.cfg.vocab_size, c.tp, c.tp_rank).total
    return TensorPlan(tl.LM_HEAD, (rows, c.cfg.hidden_size), c.dtype, src, note)


def _qkv(c: _Ctx, layer: int, kind: str) -> tuple[Source, tuple[int, ...], str]:
    """Fused [q_r; k_r; v_r] of this rank, for kind "weight" or "bias"."""
    cfg, d = c.cfg, c.cfg.head_dim
    q = q_heads_for_rank(cfg.num_attention_heads, c.tp, c.tp_rank)
    kv = kv_heads_for_rank(cfg.num_key_value_heads, c.tp, c.tp_rank)
    parts = tuple(
        _rows(hf.layer_tensor(layer, f"{proj}.{kind}"), *heads.rows(d))
        for proj, heads in ((hf.Q_PROJ, q), (hf.K_PROJ, kv), (hf.V_PROJ, kv))
    )
    rows = (q.count + 2 * kv.count) * d
    shape = (rows, cfg.hidden_size) if kind == "weight" else (rows,)
    note = f"q heads {q.first}..{q.first + q.count - 1}; kv heads {kv.first}..{kv.first + kv.count - 1}"
    if cfg.num_key_value_heads < c.tp:
        note += (f" (kv head {kv.first} duplicated on {c.tp // cfg.num_key_value_heads} ranks, "
                 f"tp_size {c.tp} > num_key_value_heads {cfg.num_key_value_heads})")
    return Concat(parts), shape, note


def _layer(c: _Ctx, layer: int, local: int) -> list[TensorPlan]:
    cfg, dt = c.cfg, c.dtype
    H, I = cfg.hidden_size, cfg.intermediate_size
    attn = cfg.num_attention_heads * cfg.head_dim
    src = lambda suffix: hf.layer_tensor(layer, suffix)  # noqa: E731
    out = lambda suffix, shape, source, note="": TensorPlan(  # noqa: E731
        tl.layer_tensor(local, suffix), shape, dt, source, note)
    i0, i1 = split_range(I, c.tp, c.tp_rank)
    a0, a1 = split_range(attn, c.tp, c.tp_rank)
    qkv_src, qkv_shape, qkv_note = _qkv(c, layer, "weight")
    plans = [
        out(tl.INPUT_LAYERNORM, (H,), Read(src(hf.INPUT_LAYERNORM))),
        out(tl.QKV_WEIGHT, qkv_shape, qkv_src, qkv_note),
    ]
    if cfg.attention_bias:
        bias_src, bias_shape, bias_note = _qkv(c, layer, "bias")
        plans.append(out(tl.QKV_BIAS, bias_shape, bias_src, bias_note))
    plans.append(out(tl.DENSE_WEIGHT, (H, a1 - a0), Read(src(hf.O_PROJ + ".weight"), 1, a0, a1)))
    if cfg.attention_bias:
        # RowLinear adds its bias once after the all-reduce, so every rank holds all of it.
        plans.append(out(tl.DENSE_BIAS, (H,), Read(src(hf.O_PROJ + ".bias"))))
    plans += [
        out(tl.POST_LAYERNORM, (H,), Read(src(hf.POST_ATTENTION_LAYERNORM))),
        out(tl.MLP_FC_WEIGHT, (i1 - i0, H), _rows(src(hf.GATE_PROJ + ".weight"), i0, i1),
            "HF gate_proj (the SiLU branch)"),
        out(tl.MLP_GATE_WEIGHT, (i1 - i0, H), _rows(src(hf.UP_PROJ + ".weight"), i0, i1),
            "HF up_proj"),
        out(tl.MLP_PROJ_WEIGHT, (H, i1 - i0), Read(src(hf.DOWN_PROJ + ".weight"), 1, i0, i1)),
    ]
    if cfg.mlp_bias:
        # Not written by TRT-LLM's own LLaMA converter; layout follows the layer classes:
        # ColumnLinear biases are split like their rows, the RowLinear bias is replicated.
        plans += [
            out(tl.MLP_FC_BIAS, (i1 - i0,), _rows(src(hf.GATE_PROJ + ".bias"), i0, i1)),
            out(tl.MLP_GATE_BIAS, (i1 - i0,), _rows(src(hf.UP_PROJ + ".bias"), i0, i1)),
            out(tl.MLP_PROJ_BIAS, (H,), Read(src(hf.DOWN_PROJ + ".bias"))),
        ]
    return plans


def _rank_tensors(c: _Ctx, pp_rank: int, pp_size: int, layers: list[int]) -> list[TensorPlan]:
    plans: list[TensorPlan] = []
    if pp_rank == 0:
        plans.append(_embedding(c))
    for local, layer in enumerate(layers):
        plans += _layer(c, layer, local)
    if pp_rank == pp_size - 1:
        plans.append(TensorPlan(tl.LN_F, (c.cfg.hidden_size,), c.dtype, Read(hf.FINAL_NORM)))
        plans.append(_lm_head(c))
    return plans


def plan_tensors(
    model_config: ModelConfig,
    source: TensorSource,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
) -> ConvertManifest:
    """Plan every rank's tensors. Raises UserError for an invalid mapping or dtype.

    `source` must already be validated against `model_config` (SourceCheckpoint.validate); the
    planned shapes are checked against the source shapes here as well.
    """
    problems = check_mapping(model_config, tp_size, pp_size, use_parallel_embedding,
                             embedding_sharding_dim)
    if problems:
        raise UserError("\n".join(f"{path}: {msg}" for path, msg in problems))
    out_dtype = resolve_dtype(dtype, model_config.torch_dtype)
    config = build_checkpoint_config(
        model_config, dtype=out_dtype, tp_size=tp_size, pp_size=pp_size,
        use_parallel_embedding=use_parallel_embedding,
        embedding_sharding_dim=embedding_sharding_dim,
    )
    ranks = []
    used: dict[str, SourceTensor] = {}
    for coords in all_ranks(tp_size, pp_size):
        ctx = _Ctx(model_config, out_dtype, tp_size, coords.tp_rank, use_parallel_embedding,
                   embedding_sharding_dim)
        layers = pp_layers(model_config.num_hidden_layers, pp_size, coords.pp_rank)
        tensors = _rank_tensors(ctx, coords.pp_rank, pp_size, layers)
        for t in tensors:
            _check_plan(t, source, used)
        ranks.append(RankPlan(coords.rank, coords.tp_rank, coords.pp_rank, tuple(layers),
                              tuple(tensors)))
    return ConvertManifest(config=config, source=dict(sorted(used.items())), ranks=tuple(ranks))


def _check_plan(plan: TensorPlan, source: TensorSource, used: dict[str, SourceTensor]) -> None:
    names = source_tensors_of(plan.source)
    for n in names:
        if n not in source:
            raise UserError(f"source tensor '{n}' (needed for {plan.name}) is missing")
        if n not in used:
            used[n] = SourceTensor(str(source.dtype(n)).removeprefix("torch."),
                                   tuple(source.shape(n)))
    got = source_shape(plan.source, {n: used[n].shape for n in names})
    if got != plan.shape:  # a planner bug, or a source that slipped past validation
        raise ValueError(f"{plan.name}: planned shape {plan.shape} but source gives {got}")


def plan_convert(
    model_dir: str | Path,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
) -> ConvertManifest:
    """Read config.json, open and validate the weights, and plan the conversion."""
    cfg = read_model_config(model_dir)
    source = SourceCheckpoint(model_dir)
    source.validate(cfg)
    return plan_tensors(cfg, source, tp_size=tp_size, pp_size=pp_size, dtype=dtype,
                        use_parallel_embedding=use_parallel_embedding,
                        embedding_sharding_dim=embedding_sharding_dim)
