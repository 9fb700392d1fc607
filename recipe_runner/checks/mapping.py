"""The recipe's `mapping` against the source model: tp_size, pp_size and the embedding split, from
the facts of trtllm/mapping.py (which sizes a model allows), as (recipe field, message)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from recipe_runner.trtllm.mapping import ParallelMapping, allowed_tp_sizes, tp_problems

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig

Finding = tuple[str, str]
TP_FIELD = "mapping.tp_size"
PP_FIELD = "mapping.pp_size"
EMBEDDING_DIM_FIELD = "mapping.embedding_sharding_dim"


def mapping_findings(mapping: ParallelMapping, model: "ModelConfig") -> list[Finding]:
    """All reasons `mapping` cannot shard `model`; empty when it can. Messages say which values work."""
    return [*_embedding_dim_findings(mapping), *_tp_findings(mapping, model), *_pp_findings(mapping, model)]


def _listed(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _embedding_dim_findings(mapping: ParallelMapping) -> list[Finding]:
    if mapping.embedding_sharding_dim in (0, 1):
        return []
    return [(EMBEDDING_DIM_FIELD, f"embedding_sharding_dim={mapping.embedding_sharding_dim} is not "
             "allowed (allowed: 0 = split the vocabulary rows, 1 = split the hidden dimension)")]


def _tp_findings(mapping: ParallelMapping, cfg: "ModelConfig") -> list[Finding]:
    tp = mapping.tp_size
    if not isinstance(tp, int) or tp < 1:
        return [(TP_FIELD, f"tp_size={tp} must be an integer >= 1")]
    reasons = tp_problems(cfg, tp, parallel_dim1=False)
    allowed = _listed(allowed_tp_sizes(cfg))
    problems = [(TP_FIELD, f"tp_size={tp} {reason} (allowed: {allowed})") for reason in reasons]
    parallel_dim1 = mapping.use_parallel_embedding and mapping.embedding_sharding_dim == 1
    if not reasons and parallel_dim1 and cfg.hidden_size % tp:
        problems.append(
            (EMBEDDING_DIM_FIELD, f"embedding_sharding_dim=1 splits hidden_size="
             f"{cfg.hidden_size} across tp_size={tp}, which does not divide it; use "
             "embedding_sharding_dim: 0 (vocabulary rows, padded as needed) or a tp_size "
             f"from: {_listed(allowed_tp_sizes(cfg, parallel_dim1=True))}")
        )
    return problems


def _pp_findings(mapping: ParallelMapping, cfg: "ModelConfig") -> list[Finding]:
    pp = mapping.pp_size
    if not isinstance(pp, int) or pp < 1:
        return [(PP_FIELD, f"pp_size={pp} must be an integer >= 1")]
    if pp > cfg.num_hidden_layers:
        return [(PP_FIELD, f"pp_size={pp} exceeds num_hidden_layers={cfg.num_hidden_layers}; "
                 f"every pipeline stage needs at least one layer (allowed: 1 to "
                 f"{cfg.num_hidden_layers})")]
    return []
