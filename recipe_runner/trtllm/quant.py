"""The quantized parts of the TensorRT-LLM checkpoint format: the `quantization` section of
config.json (each algo's QuantAlgo name is in quant/algorithms.py), how `exclude_modules` matches
(module names: models/), and the tensor names each algorithm adds
(docs/format/trtllm-checkpoint.md §2.4, §4, §4.6; docs/format/verified-layouts.md).

Facts copied here from TensorRT-LLM's source (trtllm-build reads the checkpoint this way; nothing outside the
package is read at run time):
* QuantAlgo is a StrEnum whose serialized value equals the member name.
* `exclude_modules` are fnmatch patterns over module names (`lm_head`,
  `transformer.layers.3.mlp.fc`, with pipeline-local layer indices). When the field is null,
  trtllm-build excludes DEFAULT_EXCLUDES; when it is set, only what it lists — and later
  releases then quantize the embedding table too for weight-only algos. So a written list
  always starts with DEFAULT_EXCLUDES.
* The build-time weight-only quantizer (W8A16/W4A16) matches the same patterns against tensor
  names (`….mlp.fc.weight`), so every pattern is also written with `.weight` appended: both
  matchers then agree on what stays unquantized.
"""
from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from recipe_runner.quant.algorithms import AWQ, KV_CACHES, SMOOTHQUANT
from recipe_runner.quant.sq_auto import is_auto
from recipe_runner.trtllm.config import quant_config

if TYPE_CHECKING:
    from recipe_runner.quant.settings import QuantSettings

DEFAULT_EXCLUDES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                    "*shared_expert_gate")


def is_excluded(module: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def config_exclude_modules(patterns: Sequence[str]) -> list[str]:
    """The exclude_modules list for config.json (see the module docstring for why this shape)."""
    out: list[str] = []
    for p in (*DEFAULT_EXCLUDES, *patterns, *(f"{p}.weight" for p in patterns)):
        if p not in out:
            out.append(p)
    return out


def quantization_section(settings: QuantSettings, searched_alpha: float | None = None) -> dict[str, Any]:
    """config.json `quantization` for a recipe's quantization settings (QuantAlgo names: quant/algorithms.py);
    `searched_alpha`: with smoothquant_alpha auto, what smoothquant_val says (sq_auto.mean_alpha)."""
    algorithm = settings.algorithm
    quant_algo = algorithm.trtllm_quant_algo
    fields: dict[str, Any] = {"quant_algo": quant_algo,
                              "kv_cache_quant_algo": KV_CACHES[settings.kv_cache].trtllm_kv_algo}
    if algorithm.family == AWQ:
        fields.update(group_size=settings.group_size, pre_quant_scale=True, has_zero_point=False)
    if algorithm.family == SMOOTHQUANT:
        # One float in QuantConfig (`smoothquant_val: float = 0.5`). In TensorRT-LLM's sources (read at 0.14.0.dev
        # and 0.17.0.dev) only its own converters read it, when they smooth a Hugging Face model themselves
        # (models/<family>/convert.py, e.g. llama's quantize(): smooth_llama_model(..., quant_config.smoothquant_val,
        # ...)); trtllm-build takes the smoothing from the checkpoint's tensors. So for auto it is informational:
        # the mean searched α, a float as QuantConfig declares, the per-layer α in smoothquant.json beside it.
        if is_auto(settings.smoothquant_alpha):
            if searched_alpha is None:
                raise ValueError("smoothquant_alpha auto needs the searched alpha")
            fields["smoothquant_val"] = searched_alpha
        else:
            fields["smoothquant_val"] = settings.smoothquant_alpha
    if quant_algo is not None:
        fields["exclude_modules"] = config_exclude_modules(settings.exclude_modules)
    return quant_config(**fields)


# ---- per-layer tensor suffixes of quantized checkpoints (below transformer.layers.{i}.) ----------

WEIGHT = "weight"
PER_CHANNEL_SCALE = "per_channel_scale"  # SQ plugin: float32 [1, out_l] or [1, 1]
ACT_SCALE = "act_scale"  # SQ plugin static: float32 [1, 1]
SMOOTHER = "smoother"  # SQ plugin row-parallel: float32 [1, in_l]
WEIGHTS_SCALING_FACTOR = "weights_scaling_factor"  # FP8 [1], SQ ModelOpt [out], AWQ [out, in/group]
ACTIVATION_SCALING_FACTOR = "activation_scaling_factor"  # FP8 / SQ ModelOpt: float32 [1]
PREQUANT_SCALING_FACTOR = "prequant_scaling_factor"  # SQ ModelOpt / AWQ: model dtype [in_l]
SCALE_TO_INT = "scale_to_int"  # SQ plugin norms: float32 [1]
ATTENTION_QUANTIZATION_SCALING_FACTOR = "attention.quantization_scaling_factor"  # SQ plugin static
MLP_QUANTIZATION_SCALING_FACTOR = "mlp.quantization_scaling_factor"  # SQ plugin static
KV_CACHE_SCALING_FACTOR = "attention.kv_cache_scaling_factor"  # float32 [1]
