"""The shard stage's tensor planner: every TensorRT-LLM tensor of every rank as lazy reads of the
HF source (and of the quantize stage's artifact, when there is one).

The result, a `ConvertManifest`, is the in-memory plan of every rank tensor: the shard stage makes
it and executes it straight away (stages/shard.py), and the Python API does the same; it is never
cached or written. No tensor is materialized here: each planned tensor says which HF tensor(s) to
read, which rows/columns, where zero padding goes and how the pieces are concatenated. It is small
and JSON-serializable, so tests and scripts can inspect it.

The manifest's data model lives in `stages/manifest.py`; names and splits come from the model
layout (models/). KV-head duplication
needs no operation of its own: a rank holding a duplicated head reads that head's rows, so
several ranks read the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union

import torch

from recipe_runner.errors import SourceModelError, UserError
from recipe_runner.hf.config import ModelConfig, read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.models import layout_for
from recipe_runner.models.layout import (
    KV_HEADS,
    Q_HEADS,
    REPLICATED,
    ROW,
    VOCAB,
    WEIGHT,
    Linear,
    ModelLayout,
    ModelTensor,
    Projection,
)
from recipe_runner.stages.manifest import (Concat, ConvertManifest, RankPlan, Read, Source, SourceTensor, TensorPlan,
                                           Zeros, source_shape, source_tensors_of)
from recipe_runner.stages.quantized import QuantizedArtifact, apply_layer_rules
from recipe_runner.trtllm.config import build_checkpoint_config, resolve_dtype
from recipe_runner.checks.mapping import mapping_findings
from recipe_runner.trtllm.mapping import ParallelMapping, all_ranks, pp_layers
from recipe_runner.trtllm.sharding import heads_for_rank, in_cols, out_rows, split_range, vocab_rows_for_rank

if TYPE_CHECKING:
    from recipe_runner.trtllm.releases import Release


# ---- planning --------------------------------------------------------------------------------


class TensorSource(Protocol):
    """What planning needs from a source checkpoint (SourceCheckpoint satisfies it)."""

    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def validate(self, model_config: ModelConfig) -> None: ...


@dataclass(frozen=True)
class _Ctx:
    cfg: ModelConfig
    dtype: str
    mapping: ParallelMapping
    tp_rank: int
    quantized: "QuantizedArtifact | None" = None

    @property
    def tp(self) -> int:
        return self.mapping.tp_size

    @property
    def layout(self) -> ModelLayout:
        return layout_for(self.cfg)


def _padded_vocab_rows(c: _Ctx, tensor: str, shape: tuple[int, ...]) -> tuple[Source, str]:
    """This rank's block of a vocabulary-row-split tensor, zero-padded to ceil(V/tp) rows."""
    rows = vocab_rows_for_rank(shape[0], c.tp, c.tp_rank)
    parts: list[Union[Read, Zeros]] = []
    if rows.stop > rows.start:
        parts.append(Read(tensor, 0, rows.start, rows.stop))
    if rows.pad_rows:
        parts.append(Zeros((rows.pad_rows, *shape[1:])))
    note = (f"vocab rows {rows.start}..{rows.stop - 1} + {rows.pad_rows} zero rows"
            if rows.pad_rows else "")
    src: Source = parts[0] if len(parts) == 1 else Concat(tuple(parts))
    return src, note


def _model_tensor(c: _Ctx, tensor: ModelTensor, split: str, source: str | None = None,
                  note: str = "") -> TensorPlan:
    """A tensor outside the layers, read from `source` (its own HF tensor by default), cut by `split`."""
    name, shape = source or tensor.hf, tensor.size(c.cfg)
    if split == REPLICATED:
        return TensorPlan(tensor.trtllm, shape, c.dtype, Read(name), note)
    if split == VOCAB:
        src, vocab_note = _padded_vocab_rows(c, name, shape)
        rows = vocab_rows_for_rank(shape[0], c.tp, c.tp_rank).total
        return TensorPlan(tensor.trtllm, (rows, *shape[1:]), c.dtype, src,
                          "; ".join(n for n in (note, vocab_note) if n))
    if split == ROW:  # the columns (the embedding with embedding_sharding_dim 1)
        start, stop = split_range(shape[1], c.tp, c.tp_rank)
        return TensorPlan(tensor.trtllm, (shape[0], stop - start), c.dtype, Read(name, 1, start, stop), note)
    raise ValueError(f"{tensor.trtllm}: no plan for split {split!r}")


def _embedding(c: _Ctx) -> TensorPlan:
    m, embedding = c.mapping, c.layout.embedding
    # TensorRT-LLM cuts the embedding only with use_parallel_embedding: as the layout says along
    # embedding_sharding_dim 0, by hidden columns along 1
    split = REPLICATED if not m.use_parallel_embedding else embedding.split if m.embedding_sharding_dim == 0 else ROW
    return _model_tensor(c, embedding, split)


def _lm_head(c: _Ctx) -> TensorPlan:
    layout = c.layout
    if not c.cfg.tie_word_embeddings:
        return _model_tensor(c, layout.lm_head, layout.lm_head.split)
    # Tied models use the embedding as lm_head (HF semantics); it is written as its own tensor.
    tied = f"tied: from {layout.embedding.hf_module.rsplit('.', 1)[-1]}"
    return _model_tensor(c, layout.lm_head, layout.lm_head.split, layout.embedding.hf, tied)


def _projection_block(c: _Ctx, layer: int, projection: Projection, kind: str) -> tuple[Read, tuple[int, ...]]:
    """This rank's block of one HF projection's `kind` tensor (weight or bias), and its shape."""
    name = c.layout.hf_layer_tensor(layer, f"{projection.hf}.{kind}")
    shape, split = projection.shape(c.cfg, kind), projection.split_of(kind)
    if split == REPLICATED:
        return Read(name), shape
    if split == ROW:
        start, stop = in_cols(projection, c.cfg, c.tp, c.tp_rank)
        return Read(name, 1, start, stop), (shape[0], stop - start)
    start, stop = out_rows(projection, c.cfg, c.tp, c.tp_rank)
    return Read(name, 0, start, stop), (stop - start, *shape[1:])


def _heads_note(c: _Ctx, projections: list[Projection]) -> str:
    """Which heads a head-split linear (the fused qkv) holds on this rank."""
    q_proj = next(p for p in projections if p.split == Q_HEADS)
    kv_proj = next(p for p in projections if p.split == KV_HEADS)
    q, kv = (heads_for_rank(p, c.cfg, c.tp, c.tp_rank) for p in (q_proj, kv_proj))
    note = (f"q heads {q.first}..{q.first + q.count - 1}; "
            f"kv heads {kv.first}..{kv.first + kv.count - 1}")
    nkv = kv_proj.out.count(c.cfg)
    if nkv < c.tp:
        note += (f" (kv head {kv.first} duplicated on {c.tp // nkv} ranks, "
                 f"tp_size {c.tp} > num_key_value_heads {nkv})")
    return note


def _linear(c: _Ctx, layer: int, local: int, linear: Linear, kind: str) -> TensorPlan:
    """One TensorRT-LLM linear's weight or bias on this rank: the rank's block of every projection it
    fuses, stacked by rows ([q_r; k_r; v_r] for the qkv)."""
    projections = [c.layout.projection(p) for p in linear.projections]
    blocks = [_projection_block(c, layer, p, kind) for p in projections]
    if len(blocks) == 1:
        (source, shape), = blocks
    else:
        source = Concat(tuple(read for read, _ in blocks))
        shape = (sum(s[0] for _, s in blocks), *blocks[0][1][1:])
    if any(p.split in (Q_HEADS, KV_HEADS) for p in projections):
        note = _heads_note(c, projections)
    else:
        note = projections[0].note if kind == WEIGHT else ""
    name = c.layout.trtllm_layer_tensor(local, f"{linear.name}.{kind}")
    return TensorPlan(name, shape, c.dtype, source, note)


def _layer(c: _Ctx, layer: int, local: int) -> list[TensorPlan]:
    """Decoder layer `layer` (`local` on this pipeline stage): each input group's norm, then its linears."""
    layout, plans = c.layout, []
    for group in layout.groups:
        if group.norm is not None:
            plans.append(TensorPlan(layout.trtllm_layer_tensor(local, group.norm.trtllm_weight),
                                    (c.cfg.hidden_size,), c.dtype,
                                    Read(layout.hf_layer_tensor(layer, group.norm.hf_weight))))
        for linear in (lin for lin in layout.linears if lin.group == group):
            kinds = layout.projection(linear.projections[0]).kinds(c.cfg)
            plans += [_linear(c, layer, local, linear, kind) for kind in kinds]
    if c.quantized is not None:  # quantized tensors and scales replace or join the plain ones
        plans = apply_layer_rules(plans, c.quantized, c.cfg, c.tp, c.tp_rank, layer, local)
    return plans


def _rank_tensors(c: _Ctx, pp_rank: int, pp_size: int, layers: list[int]) -> list[TensorPlan]:
    plans: list[TensorPlan] = []
    if pp_rank == 0:
        plans.append(_embedding(c))
    for local, layer in enumerate(layers):
        plans += _layer(c, layer, local)
    if pp_rank == pp_size - 1:
        plans.append(_model_tensor(c, c.layout.final_norm, c.layout.final_norm.split))
        plans.append(_lm_head(c))
    return plans


def require_valid_mapping(model_config: ModelConfig, mapping: ParallelMapping) -> None:
    problems = mapping_findings(mapping, model_config)
    if problems:
        raise UserError("\n".join(f"{path}: {msg}" for path, msg in problems))


def plan_rank_tensors(
    model_config: ModelConfig,
    source: TensorSource,
    *,
    mapping: ParallelMapping,
    dtype: str = "auto",
    quantized: "QuantizedArtifact | None" = None,
    release: "Release | None" = None,
) -> ConvertManifest:
    """Plan every rank's tensors (no tensor data is read); config.json for `release` (default: the
    newest recorded TensorRT-LLM release).

    With `quantized` (the quantize stage's artifact), `source` must also hold the artifact's
    tensors (a LayeredCheckpoint); its rules replace or add per-layer tensors and its
    `quantization` section goes into config.json.

    Raises UserError for an invalid mapping or dtype, SourceModelError when `source` does not
    hold the tensors `model_config` implies (checked here with `source.validate`).
    """
    # The one mapping check for callers that come straight here (the shard stage, whose recipe
    # may not have been checked against the model at plan time; scripts); plan_convert checks
    # earlier itself and calls _plan_checked.
    require_valid_mapping(model_config, mapping)
    return _plan_checked(model_config, source, mapping, dtype, quantized, release)


def _plan_checked(model_config: ModelConfig, source: TensorSource, mapping: ParallelMapping, dtype: str,
                  quantized: "QuantizedArtifact | None", release: "Release | None" = None) -> ConvertManifest:
    """plan_rank_tensors once `mapping` is known to be valid for `model_config`."""
    out_dtype = resolve_dtype(dtype, model_config.torch_dtype)
    source.validate(model_config)
    config = build_checkpoint_config(
        model_config, dtype=out_dtype, mapping=mapping,
        # rebuilt through quant_config(): the release's QuantConfig fields, in its order
        quantization=quantized.quant_config if quantized is not None else None, release=release,
    )
    ranks = []
    used: dict[str, SourceTensor] = {}
    for coords in all_ranks(mapping.tp_size, mapping.pp_size):
        ctx = _Ctx(model_config, out_dtype, mapping, coords.tp_rank, quantized)
        layers = pp_layers(model_config.num_hidden_layers, mapping.pp_size, coords.pp_rank)
        tensors = _rank_tensors(ctx, coords.pp_rank, mapping.pp_size, layers)
        for t in tensors:
            _check_plan(t, source, used)
        ranks.append(RankPlan(coords.rank, coords.tp_rank, coords.pp_rank, tuple(layers),
                              tuple(tensors)))
    return ConvertManifest(config=config, source=dict(sorted(used.items())), ranks=tuple(ranks))


def _check_plan(plan: TensorPlan, source: TensorSource, used: dict[str, SourceTensor]) -> None:
    names = source_tensors_of(plan.source)
    for n in names:
        if n not in source:
            raise SourceModelError(f"source tensor '{n}' (needed for {plan.name}) is missing; "
                                   "the weights do not match config.json")
        if n not in used:
            used[n] = SourceTensor(str(source.dtype(n)).removeprefix("torch."),
                                   tuple(source.shape(n)))
    got = source_shape(plan.source, {n: used[n].shape for n in names})
    # A plan may add or drop size-1 dims (a [n] scale written as [1, n]): same bytes, same order.
    if _squeezed(got) != _squeezed(plan.shape):  # a planner bug, or a source that slipped past validation
        raise ValueError(f"{plan.name}: planned shape {plan.shape} but source gives {got}")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def plan_convert(model_dir: str | Path, *, mapping: ParallelMapping, dtype: str = "auto",
                 release: "Release | None" = None) -> ConvertManifest:
    """Read config.json, open and validate the weights, and plan the conversion (for `release`)."""
    cfg = read_model_config(model_dir)
    # mapping problems are reported before the weights are even opened (the only check here)
    require_valid_mapping(cfg, mapping)
    return _plan_checked(cfg, SourceCheckpoint(model_dir), mapping, dtype, None, release)
