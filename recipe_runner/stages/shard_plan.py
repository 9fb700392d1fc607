"""The shard stage's tensor planner: every TensorRT-LLM tensor of every rank as lazy reads of the
HF source (and of the quantize stage's artifact, when there is one).

The result, a `ConvertManifest`, is the in-memory plan of every rank tensor: the shard stage makes
it and executes it straight away (stages/shard.py), and the Python API does the same; it is never
cached or written. No tensor is materialized here: each planned tensor says which HF tensor(s) to
read, which rows/columns, where zero padding goes and how the pieces are concatenated. It is small
and JSON-serializable, so tests and scripts can inspect it.

The manifest's data model lives in `stages/manifest.py` (re-exported here). KV-head duplication
needs no operation of its own: a rank holding a duplicated head reads that head's rows, so
several ranks read the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union

import torch

from recipe_runner.errors import SourceModelError, UserError
from recipe_runner.hf import names as hf
from recipe_runner.hf.config import ModelConfig, read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.stages.manifest import (  # noqa: F401  (re-exported for callers)
    MANIFEST_FORMAT,
    Concat,
    ConvertManifest,
    RankPlan,
    Read,
    Source,
    SourceTensor,
    TensorPlan,
    Zeros,
    source_shape,
    source_tensors_of,
)
from recipe_runner.trtllm import names as tl
from recipe_runner.trtllm.config import build_checkpoint_config, quant_config, resolve_dtype
from recipe_runner.trtllm.mapping import ParallelMapping, all_ranks, pp_layers
from recipe_runner.trtllm.sharding import (
    kv_heads_for_rank,
    q_heads_for_rank,
    split_range,
    vocab_rows_for_rank,
)

if TYPE_CHECKING:
    from recipe_runner.stages.quantized import QuantizedArtifact


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
    if not c.mapping.use_parallel_embedding:
        return TensorPlan(tl.VOCAB_EMBEDDING, (V, H), c.dtype, Read(hf.EMBED_TOKENS))
    if c.mapping.embedding_sharding_dim == 0:
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
    note = (f"q heads {q.first}..{q.first + q.count - 1}; "
            f"kv heads {kv.first}..{kv.first + kv.count - 1}")
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
    if c.quantized is not None:  # quantized tensors and scales replace or join the plain ones
        from recipe_runner.stages.quantized import apply_layer_rules

        plans = apply_layer_rules(plans, c.quantized, cfg, c.tp, c.tp_rank, layer, local)
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


def require_valid_mapping(model_config: ModelConfig, mapping: ParallelMapping) -> None:
    problems = mapping.check(model_config)
    if problems:
        raise UserError("\n".join(f"{path}: {msg}" for path, msg in problems))


def plan_rank_tensors(
    model_config: ModelConfig,
    source: TensorSource,
    *,
    mapping: ParallelMapping,
    dtype: str = "auto",
    quantized: "QuantizedArtifact | None" = None,
) -> ConvertManifest:
    """Plan every rank's tensors (no tensor data is read).

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
    return _plan_checked(model_config, source, mapping, dtype, quantized)


def _plan_checked(model_config: ModelConfig, source: TensorSource, mapping: ParallelMapping, dtype: str,
                  quantized: "QuantizedArtifact | None") -> ConvertManifest:
    """plan_rank_tensors once `mapping` is known to be valid for `model_config`."""
    out_dtype = resolve_dtype(dtype, model_config.torch_dtype)
    source.validate(model_config)
    config = build_checkpoint_config(
        model_config, dtype=out_dtype, mapping=mapping,
        # rebuilt through quant_config(): QuantConfig's field order, whatever order the artifact kept
        quantization=quant_config(**quantized.quant_config) if quantized is not None else None,
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


def plan_convert(model_dir: str | Path, *, mapping: ParallelMapping, dtype: str = "auto") -> ConvertManifest:
    """Read config.json, open and validate the weights, and plan the conversion."""
    cfg = read_model_config(model_dir)
    # mapping problems are reported before the weights are even opened (the only check here)
    require_valid_mapping(cfg, mapping)
    return _plan_checked(cfg, SourceCheckpoint(model_dir), mapping, dtype, None)
