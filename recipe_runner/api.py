"""Python API for scripting users: convert a HF model directory to a TensorRT-LLM checkpoint; search
SmoothQuant's α per layer as `smoothquant_alpha: auto` does."""
from __future__ import annotations

from pathlib import Path

from recipe_runner.quant.algorithms import ALGORITHMS, SMOOTHQUANT, SMOOTHQUANT_STATISTICS
from recipe_runner.quant.sq_auto import AlphaSearch, AlphaSearchResult
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


def smoothquant_alpha_search(
    model_dir: str | Path,
    calibration_file: str | Path,
    *,
    algo: str = "w8a8_sq_per_channel_per_token",
    num_samples: int = 512,
    max_seq_len: int = 512,
    batch_size: int = 1,
    seed: int = 0,
    text_field: str = "text",
    trust_remote_code: bool = False,
) -> AlphaSearchResult:
    """What `smoothquant_alpha: auto` chooses for `model_dir` over a local calibration file (.txt, .jsonl,
    .json; the recipe's quantization.calibration fields by the same names): per layer and input group its own
    choice and the output error at every grid α (`result.alphas[(layer, "self_attn.q_proj")]`, groups named
    by their first projection), each candidate's next-token loss (`result.selection`), the α kept
    (`result.kept()`); `result.report()` is smoothquant.json. The calibrate stage's own
    code, so a recipe with the same settings chooses the same α."""
    from recipe_runner.stages.calibrate import CalibrationSettings, calibrate  # transformers: not for convert

    if ALGORITHMS[algo].family != SMOOTHQUANT:
        raise ValueError(f"algo {algo} is not SmoothQuant: it has no alpha to search")
    path = Path(calibration_file)
    settings = CalibrationSettings(path.name, path, text_field, "train", num_samples, max_seq_len, seed, batch_size,
                                   statistics=(SMOOTHQUANT_STATISTICS,), smoothquant_search=AlphaSearch(algo))
    stats = calibrate(Path(model_dir), settings, trust_remote_code=trust_remote_code)
    return stats.alpha_result()
