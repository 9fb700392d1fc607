"""Parallel mapping of a TensorRT-LLM checkpoint: which rank holds which layers, and which
(tp_size, pp_size) a model allows.

Facts (docs/format/trtllm-checkpoint.md §1, §3.4; docs/format/verified-layouts.md):
rank = pp_rank·tp_size + tp_rank (TP fastest); pipeline stages get contiguous layer blocks with
`torch.tensor_split` semantics, i.e. the first L % pp stages get one extra layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # keep this module importable without torch / the HF reader
    from recipe_runner.hf.config import ModelConfig

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
    """KV heads are split when tp divides them and duplicated when they divide tp
    (docs/format/trtllm-checkpoint.md §3.1)."""
    return num_kv_heads % tp_size == 0 or tp_size % num_kv_heads == 0


def tp_problems(cfg: "ModelConfig", tp: int, parallel_dim1: bool) -> list[str]:
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
        if not tp_problems(cfg, tp, parallel_dim1)
    ]


@dataclass(frozen=True)
class ParallelMapping:
    """How a checkpoint is split across ranks: the recipe's `mapping` section, built once and
    passed whole, so tp/pp and the embedding split cannot drift apart between stages.

    Values are kept as given (no coercion): checks/mapping.py reports a bad tp_size/pp_size in the
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
