"""Python API for scripting users: convert a HF model directory to a TensorRT-LLM checkpoint."""
from __future__ import annotations

from pathlib import Path

from recipe_runner.stages.shard_plan import plan_convert
from recipe_runner.stages.shard import write_checkpoint
from recipe_runner.trtllm.mapping import ParallelMapping


def convert(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    dtype: str = "auto",
    use_parallel_embedding: bool = False,
    embedding_sharding_dim: int = 0,
    workers: int = 1,
) -> Path:
    """Write config.json + rank{N}.safetensors for `model_dir` into `out_dir`; returns out_dir.

    dtype "auto" keeps the model's torch_dtype (float32 when config.json has none). Raises
    UserError (SourceModelError for problems with the source) with an actionable message.
    """
    # the documented keyword signature stays; inside, the mapping travels as one value
    mapping = ParallelMapping(tp_size, pp_size, use_parallel_embedding, embedding_sharding_dim)
    manifest = plan_convert(model_dir, mapping=mapping, dtype=dtype)
    return write_checkpoint(manifest, model_dir, out_dir, workers=workers)
