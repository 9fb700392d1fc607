"""A decoder family's tensor layout, stated once as data.

What a layout says: which linears a decoder layer has and which of them read the same input (and
the norm that produces it), their Hugging Face and TensorRT-LLM names, which HF projections one
TensorRT-LLM linear fuses, how tensor parallelism cuts every tensor (`split`), and the tensors
outside the layers. Everything else reads it: the source checks (`hf_tensors`), calibration's hooks,
the quantize stage, the shard planner, the HF exports' exclusion lists.

What a layout does not do: arithmetic. The split kinds below name a rule; trtllm/sharding.py
computes the ranges (`out_rows`, `in_cols`, `vocab_rows_for_rank`). Data only: no torch, and
nothing from stages/, pipeline/ or hfexport/ (they import this).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig

# How tensor parallelism cuts a tensor (the rank's share is computed in trtllm/sharding.py).
COLUMN = "column"  # output rows in tp equal blocks (TensorRT-LLM ColumnLinear)
ROW = "row"  # input columns in tp equal blocks (RowLinear)
Q_HEADS = "q_heads"  # output rows by whole query heads, tp equal blocks
KV_HEADS = "kv_heads"  # output rows by whole KV heads; with fewer KV heads than ranks, each is duplicated
VOCAB = "vocab"  # vocabulary rows, zero-padded to a multiple of tp, then tp equal blocks
REPLICATED = "replicated"  # every rank holds all of it
OUT_SPLITS = (COLUMN, Q_HEADS, KV_HEADS)  # cut along the output dimension: column-parallel linears
WEIGHT, BIAS = "weight", "bias"


@dataclass(frozen=True)
class Dim:
    """A tensor dimension as a ModelConfig field (times head_dim for a per-head dimension)."""

    config_field: str
    per_head: bool = False

    def count(self, cfg: "ModelConfig") -> int:
        """The field's value: heads for a per-head dimension."""
        return int(getattr(cfg, self.config_field))

    def size(self, cfg: "ModelConfig") -> int:
        return self.count(cfg) * (cfg.head_dim if self.per_head else 1)


HIDDEN = Dim("hidden_size")
INTERMEDIATE = Dim("intermediate_size")
VOCAB_SIZE = Dim("vocab_size")
Q_HEAD_ROWS = Dim("num_attention_heads", per_head=True)
KV_HEAD_ROWS = Dim("num_key_value_heads", per_head=True)


@dataclass(frozen=True)
class Projection:
    """One HF linear of a decoder layer: weight [out, in], optional bias [out]."""

    hf: str  # module below the HF layer prefix, e.g. "self_attn.q_proj"
    module: str  # the TensorRT-LLM linear that holds it, below the TensorRT-LLM layer prefix
    split: str  # COLUMN, ROW, Q_HEADS or KV_HEADS: how tensor parallelism cuts its weight
    out: Dim
    in_: Dim
    bias_flag: str  # the ModelConfig flag that gives it a bias
    fused: str | None = None  # the module HF-format consumers fuse it into (vLLM, TensorRT-LLM PyTorch)
    note: str = ""  # said beside its TensorRT-LLM weight where the names do not tell

    @property
    def parallel(self) -> str:
        """TensorRT-LLM's linear class: "row" (RowLinear) or "column" (ColumnLinear)."""
        return "row" if self.split == ROW else "column"

    def split_of(self, kind: str) -> str:
        """The split of its `kind` tensor ("weight" or "bias"). A bias has only the output dimension,
        and RowLinear adds its bias once after the all-reduce, so every rank holds all of it."""
        if kind == WEIGHT:
            return self.split
        return REPLICATED if self.split == ROW else self.split

    def shape(self, cfg: "ModelConfig", kind: str = WEIGHT) -> tuple[int, ...]:
        out = self.out.size(cfg)
        return (out, self.in_.size(cfg)) if kind == WEIGHT else (out,)

    def kinds(self, cfg: "ModelConfig") -> tuple[str, ...]:
        """The tensors it has in `cfg`'s checkpoint: weight, and bias where the config says so."""
        return (WEIGHT, BIAS) if getattr(cfg, self.bias_flag) else (WEIGHT,)


@dataclass(frozen=True)
class Norm:
    """An RMSNorm of a decoder layer (weight [hidden], replicated on every rank)."""

    hf: str  # module below the HF layer prefix
    trtllm: str  # module below the TensorRT-LLM layer prefix

    @property
    def hf_weight(self) -> str:
        return f"{self.hf}.{WEIGHT}"

    @property
    def trtllm_weight(self) -> str:
        return f"{self.trtllm}.{WEIGHT}"


@dataclass(frozen=True)
class InputGroup:
    """Projections that read the same input: they share one AWQ scale and one SmoothQuant smoother,
    which the norm producing that input (if any) can absorb."""

    projections: tuple[str, ...]  # HF projection names, in checkpoint order
    norm: Norm | None  # None when the input comes from another op (the attention, the activation)

    @property
    def first(self) -> str:
        """The projection calibration names the group's statistics by."""
        return self.projections[0]


@dataclass(frozen=True)
class Linear:
    """One TensorRT-LLM linear and the HF projections it fuses (their row blocks, in this order)."""

    name: str  # below the TensorRT-LLM layer prefix, e.g. "attention.qkv"
    projections: tuple[str, ...]
    parallel: str  # "column" or "row"
    group: InputGroup  # the input its projections read


@dataclass(frozen=True)
class ModelTensor:
    """A tensor outside the decoder layers."""

    hf: str
    trtllm: str
    shape: tuple[Dim, ...]
    # how tensor parallelism cuts it; for the embedding, the cut TensorRT-LLM makes with
    # use_parallel_embedding and embedding_sharding_dim 0 (dim 1 cuts hidden columns instead)
    split: str

    @property
    def hf_module(self) -> str:
        return self.hf.removesuffix(f".{WEIGHT}")

    @property
    def trtllm_module(self) -> str:
        return self.trtllm.removesuffix(f".{WEIGHT}")

    def size(self, cfg: "ModelConfig") -> tuple[int, ...]:
        return tuple(d.size(cfg) for d in self.shape)


@dataclass(frozen=True)
class ModelLayout:
    """Everything about a decoder family's checkpoints that is names and splits."""

    name: str
    hf_layer_prefix: str  # format with the layer index, e.g. "model.layers.{}."
    # TensorRT-LLM layer indices are local to the pipeline stage (every stage starts at 0)
    trtllm_layer_prefix: str
    embedding: ModelTensor
    final_norm: ModelTensor
    lm_head: ModelTensor  # a tied model has none in HF; it is written from the embedding
    projections: tuple[Projection, ...]  # checkpoint order
    groups: tuple[InputGroup, ...]  # in the order the layer runs them
    # the projections whose outputs are the attention's queries, keys and values (KV-cache scales, RoPE)
    query: str
    key: str
    value: str
    _by_name: dict[str, Projection] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.hf: p for p in self.projections})
        _check(self)

    def projection(self, name: str) -> Projection:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"{self.name} has no projection {name!r}") from None

    @property
    def projection_names(self) -> tuple[str, ...]:
        return tuple(p.hf for p in self.projections)

    def group_of(self, projection: str) -> InputGroup:
        return next(g for g in self.groups if projection in g.projections)

    @cached_property
    def linears(self) -> tuple[Linear, ...]:
        """The TensorRT-LLM linears of a layer, in the order of their first projection."""
        members: dict[str, list[Projection]] = {}
        for p in self.projections:
            members.setdefault(p.module, []).append(p)
        return tuple(Linear(name, tuple(p.hf for p in ps), ps[0].parallel, self.group_of(ps[0].hf))
                     for name, ps in members.items())

    def linear_of(self, projection: str) -> Linear:
        module = self.projection(projection).module
        return next(lin for lin in self.linears if lin.name == module)

    @cached_property
    def fused(self) -> dict[str, tuple[str, ...]]:
        """HF-format consumers' fused module -> the projections it fuses, in checkpoint order."""
        out: dict[str, tuple[str, ...]] = {}
        for p in self.projections:
            if p.fused is not None:
                out[p.fused] = (*out.get(p.fused, ()), p.hf)
        return out

    def hf_layer_tensor(self, layer: int, suffix: str) -> str:
        """e.g. (3, "self_attn.q_proj.weight") -> "model.layers.3.self_attn.q_proj.weight"; a module
        name for a module suffix."""
        return self.hf_layer_prefix.format(layer) + suffix

    def trtllm_layer_tensor(self, local: int, suffix: str) -> str:
        """e.g. (0, "attention.qkv.weight") -> "transformer.layers.0.attention.qkv.weight"; a module
        name (what exclude_modules patterns match) for a module suffix."""
        return self.trtllm_layer_prefix.format(local) + suffix

    def trtllm_modules(self, num_layers: int) -> list[str]:
        """Every TensorRT-LLM module an exclude pattern may usefully match."""
        names = [self.embedding.trtllm_module, self.lm_head.trtllm_module]
        names += [self.trtllm_layer_tensor(i, lin.name) for i in range(num_layers) for lin in self.linears]
        return names

    def hf_tensors(self, cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
        """Every tensor an HF source checkpoint of `cfg` must hold, with its shape."""
        out = {self.embedding.hf: self.embedding.size(cfg)}
        for i in range(cfg.num_hidden_layers):
            for g in self.groups:
                if g.norm is not None:
                    out[self.hf_layer_tensor(i, g.norm.hf_weight)] = (cfg.hidden_size,)
                for p in map(self.projection, g.projections):
                    out.update({self.hf_layer_tensor(i, f"{p.hf}.{k}"): p.shape(cfg, k) for k in p.kinds(cfg)})
        out[self.final_norm.hf] = self.final_norm.size(cfg)
        if not cfg.tie_word_embeddings:
            out[self.lm_head.hf] = self.lm_head.size(cfg)
        return out


def _check(layout: ModelLayout) -> None:
    """What the planners rely on: every projection in exactly one input group, and a fused linear's
    projections cut along the output dimension (their row blocks are concatenated)."""
    grouped = [p for g in layout.groups for p in g.projections]
    if sorted(grouped) != sorted(layout.projection_names):
        raise ValueError(f"{layout.name}: input groups {grouped} do not hold each projection once")
    for lin in layout.linears:
        splits = {layout.projection(p).split for p in lin.projections}
        if len(lin.projections) > 1 and not splits <= set(OUT_SPLITS):
            raise ValueError(f"{layout.name}: {lin.name} fuses projections split as {sorted(splits)}")
        if len({layout.group_of(p) for p in lin.projections}) != 1:
            raise ValueError(f"{layout.name}: {lin.name} fuses projections of different inputs")
