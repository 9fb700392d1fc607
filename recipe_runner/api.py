"""Python API for scripting users: convert a HF model directory to a TensorRT-LLM checkpoint."""
from __future__ import annotations

from pathlib import Path

from recipe_runner.stages.shard_plan import plan_convert
from recipe_runner.stages.shard import write_checkpoint
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.releases import release_named


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
    tensorrt_llm: str | None = None,
) -> Path:
    """Write config.json + rank{N}.safetensors for `model_dir` into `out_dir`; returns out_dir.

    dtype "auto" keeps the model's torch_dtype, as TensorRT-LLM's infer_dtype does (float16 for float32
    or when config.json has none). `tensorrt_llm`: the release config.json is for ("0.14"; default the
    newest recorded, trtllm/releases.py). Raises
    UserError (SourceModelError for problems with the source) with an actionable message.
    """
    # the documented keyword signature stays; inside, the mapping travels as one value
    mapping = ParallelMapping(tp_size, pp_size, use_parallel_embedding, embedding_sharding_dim)
    manifest = plan_convert(model_dir, mapping=mapping, dtype=dtype, release=release_named(tensorrt_llm))
    return write_checkpoint(manifest, model_dir, out_dir, workers=workers)
