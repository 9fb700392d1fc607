"""The TensorRT-LLM checkpoint format: names, sharding rules, mapping checks, config.json and the
streaming safetensors writer. Pure functions; stages call these and never re-derive a split."""
from recipe_runner.trtllm.config import build_checkpoint_config, quant_config, resolve_dtype
from recipe_runner.trtllm.mapping import ParallelMapping, allowed_tp_sizes, pp_layers, rank_of

__all__ = [
    "ParallelMapping",
    "allowed_tp_sizes",
    "build_checkpoint_config",
    "pp_layers",
    "quant_config",
    "rank_of",
    "resolve_dtype",
]
