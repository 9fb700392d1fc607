"""The quantized parts of the TensorRT-LLM checkpoint format: QuantAlgo names, the
`quantization` section of config.json, how `exclude_modules` matches (module names: models/), and the
tensor names each algorithm adds (spec §2.4, §4, §4.6; verified-layouts.md).

Facts copied here (trtllm-build reads them; nothing reads ../shared at run time):
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
from typing import Any, Iterable, Sequence

from recipe_runner.trtllm.config import quant_config

# recipe quantization.algo -> QuantAlgo (config.json quantization.quant_algo)
QUANT_ALGO: dict[str, str | None] = {
    "none": None,
    "w8a16": "W8A16",
    "w4a16": "W4A16",
    "w4a16_awq": "W4A16_AWQ",
    # ModelOpt's out-of-the-box form (Int8SmoothQuantLinear), verified-layouts.md
    "w8a8_sq_per_channel": "W8A8_SQ_PER_CHANNEL",
    # TensorRT-LLM's plugin forms (SmoothQuantAttention/GatedMLP/RmsNorm), spec §4.2
    "w8a8_sq_per_channel_per_token": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "w8a8_sq_per_tensor": "W8A8_SQ_PER_TENSOR_PLUGIN",
    "fp8": "FP8",
}
KV_CACHE_QUANT_ALGO: dict[str, str | None] = {"none": None, "int8": "INT8", "fp8": "FP8"}
SQ_PLUGIN_ALGOS = frozenset({"w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor"})
WEIGHT_ONLY_BITS = {"w8a16": 8, "w4a16": 4}

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


def quantization_section(algo: str, kv_cache: str, *, group_size: int, smoothquant_alpha: float,
                         exclude_modules: Sequence[str]) -> dict[str, Any]:
    """config.json `quantization` for a recipe's quantization settings."""
    quant_algo = QUANT_ALGO[algo]
    fields: dict[str, Any] = {"quant_algo": quant_algo, "kv_cache_quant_algo": KV_CACHE_QUANT_ALGO[kv_cache]}
    if algo == "w4a16_awq":
        fields.update(group_size=group_size, pre_quant_scale=True, has_zero_point=False)
    if algo.startswith("w8a8_sq"):
        fields["smoothquant_val"] = smoothquant_alpha
    if quant_algo is not None:
        fields["exclude_modules"] = config_exclude_modules(exclude_modules)
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
