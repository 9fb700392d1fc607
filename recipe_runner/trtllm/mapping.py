"""Parallel mapping of a TensorRT-LLM checkpoint: which rank holds which layers, and which
(tp_size, pp_size) a model allows.

Facts (spec §1, §3.4, verified-layouts.md): rank = pp_rank·tp_size + tp_rank (TP fastest);
pipeline stages get contiguous layer blocks with `torch.tensor_split` semantics, i.e. the first
L % pp stages get one extra layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # keep this module importable without torch / the HF reader
    from recipe_runner.hf.config import ModelConfig

# Recipe field paths the planner attaches line/col to.
TP_FIELD = "mapping.tp_size"
PP_FIELD = "mapping.pp_size"
EMBEDDING_DIM_FIELD = "mapping.embedding_sharding_dim"


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in the (pp, tp) grid."""

    rank: int
    tp_rank: int
    pp_rank: int


def rank_of(tp_rank: int, pp_rank: int, tp_size: int) -> int:
    """Global rank of (tp_rank, pp_rank); TP is the fastest-varying index."""
    return pp_rank * tp_size + tp_rank


def rank_coords(rank: int, tp_size: int) -> RankCoords:
    return RankCoords(rank=rank, tp_rank=rank % tp_size, pp_rank=rank // tp_size)


def all_ranks(tp_size: int, pp_size: int) -> list[RankCoords]:
    return [rank_coords(r, tp_size) for r in range(tp_size * pp_size)]


def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> list[int]:
    """Global layer indices held by pipeline stage `pp_rank` (torch.tensor_split semantics)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} out of range for pp_size={pp_size}")
    if pp_size > num_layers:
        raise ValueError(f"pp_size={pp_size} exceeds num_layers={num_layers}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    count = base + (1 if pp_rank < extra else 0)
    return list(range(start, start + count))


def kv_heads_compatible(num_kv_heads: int, tp_size: int) -> bool:
    """KV heads are split when tp divides them and duplicated when they divide tp (spec §3.1)."""
    return num_kv_heads % tp_size == 0 or tp_size % num_kv_heads == 0


def _tp_problems(cfg: "ModelConfig", tp: int, parallel_dim1: bool) -> list[str]:
    """Why `tp` is not a valid tensor-parallel size for `cfg` (empty list: it is)."""
    out = []
    if cfg.num_attention_heads % tp:
        out.append(f"does not divide num_attention_heads={cfg.num_attention_heads}")
    elif not kv_heads_compatible(cfg.num_key_value_heads, tp):
        out.append(
            f"is incompatible with num_key_value_heads={cfg.num_key_value_heads} (KV heads are "
            "split when tp_size divides them and duplicated when they divide tp_size)"
        )
    if cfg.intermediate_size % tp:
        out.append(f"does not divide intermediate_size={cfg.intermediate_size}")
    if parallel_dim1 and cfg.hidden_size % tp:
        out.append(
            f"does not divide hidden_size={cfg.hidden_size}, which embedding_sharding_dim=1 splits"
        )
    return out


def allowed_tp_sizes(cfg: "ModelConfig", *, parallel_dim1: bool = False) -> list[int]:
    """Every tp_size this model can be sharded with (all divide num_attention_heads)."""
    return [
        tp
        for tp in range(1, cfg.num_attention_heads + 1)
        if not _tp_problems(cfg, tp, parallel_dim1)
    ]


def _fmt_allowed(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class ParallelMapping:
    """How a checkpoint is split across ranks: the recipe's `mapping` section, built once and
    passed whole, so tp/pp and the embedding split cannot drift apart between stages.

    Values are kept as given (no coercion): `check` reports a bad tp_size/pp_size in the
    recipe's own words, so the object may hold an invalid mapping until it is checked.
    """

    tp_size: int = 1
    pp_size: int = 1
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0

    @classmethod
    def from_recipe(cls, section: Mapping[str, Any]) -> "ParallelMapping":
        """From a normalized recipe's `mapping` section (the schema fills every default)."""
        return cls(section["tp_size"], section["pp_size"], section["use_parallel_embedding"],
                   section["embedding_sharding_dim"])

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def check(self, model_config: "ModelConfig") -> list[tuple[str, str]]:
        """All reasons this mapping cannot shard this model, as (recipe field path, message).

        An empty list means the mapping is valid. Messages say what is wrong and which values work.
        """
        problems = self._embedding_dim_findings()
        problems += self._tp_findings(model_config)
        problems += self._pp_findings(model_config)
        return problems

    def _embedding_dim_findings(self) -> list[tuple[str, str]]:
        if self.embedding_sharding_dim in (0, 1):
            return []
        return [(EMBEDDING_DIM_FIELD, f"embedding_sharding_dim={self.embedding_sharding_dim} is not "
                 "allowed (allowed: 0 = split the vocabulary rows, 1 = split the hidden dimension)")]

    def _tp_findings(self, cfg: "ModelConfig") -> list[tuple[str, str]]:
        tp = self.tp_size
        if not isinstance(tp, int) or tp < 1:
            return [(TP_FIELD, f"tp_size={tp} must be an integer >= 1")]
        reasons = _tp_problems(cfg, tp, parallel_dim1=False)
        allowed = _fmt_allowed(allowed_tp_sizes(cfg))
        problems = [(TP_FIELD, f"tp_size={tp} {reason} (allowed: {allowed})") for reason in reasons]
        parallel_dim1 = self.use_parallel_embedding and self.embedding_sharding_dim == 1
        if not reasons and parallel_dim1 and cfg.hidden_size % tp:
            problems.append(
                (EMBEDDING_DIM_FIELD, f"embedding_sharding_dim=1 splits hidden_size="
                 f"{cfg.hidden_size} across tp_size={tp}, which does not divide it; use "
                 "embedding_sharding_dim: 0 (vocabulary rows, padded as needed) or a tp_size "
                 f"from: {_fmt_allowed(allowed_tp_sizes(cfg, parallel_dim1=True))}")
            )
        return problems

    def _pp_findings(self, cfg: "ModelConfig") -> list[tuple[str, str]]:
        pp = self.pp_size
        if not isinstance(pp, int) or pp < 1:
            return [(PP_FIELD, f"pp_size={pp} must be an integer >= 1")]
        if pp > cfg.num_hidden_layers:
            return [(PP_FIELD, f"pp_size={pp} exceeds num_hidden_layers={cfg.num_hidden_layers}; "
                     f"every pipeline stage needs at least one layer (allowed: 1 to "
                     f"{cfg.num_hidden_layers})")]
        return []
