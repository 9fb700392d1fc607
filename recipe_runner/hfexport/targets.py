"""Output targets and what their consumers load (hf-quantized-checkpoint spec §2, §3, read from
TensorRT-LLM's and vLLM's source; no consumer was run).

  trtllm-checkpoint      the legacy TensorRT-LLM checkpoint (shard stage) for trtllm-build
  hf-modelopt            ModelOpt unified HF: TensorRT-LLM PyTorch backend (LLM API, trtllm-serve)
                         and vLLM's modelopt / modelopt_fp4 loaders
  hf-compressed-tensors  llm-compressor's format: vLLM's compressed-tensors loader
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

TRTLLM_CHECKPOINT = "trtllm-checkpoint"
HF_MODELOPT = "hf-modelopt"
HF_COMPRESSED_TENSORS = "hf-compressed-tensors"
TARGETS = (TRTLLM_CHECKPOINT, HF_MODELOPT, HF_COMPRESSED_TENSORS)
HF_TARGETS = (HF_MODELOPT, HF_COMPRESSED_TENSORS)
DEFAULT_TARGETS = (TRTLLM_CHECKPOINT,)
# the stage that writes each HF target, and the folder of the output directory it is published at
EXPORT_STAGES = {HF_MODELOPT: "export-hf-modelopt", HF_COMPRESSED_TENSORS: "export-hf-compressed-tensors"}

TRTLLM_PYTORCH = "TensorRT-LLM's PyTorch backend"
VLLM = "vLLM"

# target -> algo -> the consumers that load it (empty: none does; the reason says what to use)
_LOADERS: dict[str, dict[str, tuple[str, ...]]] = {
    HF_MODELOPT: {"fp8": (TRTLLM_PYTORCH, VLLM), "nvfp4": (TRTLLM_PYTORCH, VLLM),
                  "w4a16_awq": (TRTLLM_PYTORCH,), "w8a16": (TRTLLM_PYTORCH,)},
    HF_COMPRESSED_TENSORS: {"w8a16": (VLLM,), "w4a16": (VLLM,), "w4a16_awq": (VLLM,), "nvfp4": (VLLM, TRTLLM_PYTORCH),
                            "w8a8_sq_per_channel": (VLLM,), "w8a8_sq_per_channel_per_token": (VLLM,)},
}
_REJECTED: dict[tuple[str, str], str] = {
    (HF_MODELOPT, "none"): "there is nothing to quantize (the source already loads as it is; an FP8 KV cache alone "
                           "is refused by vLLM's modelopt loader, and TensorRT-LLM runs its FP8 KV cache with scale "
                           "1.0); choose a quantization.algo",
    (HF_COMPRESSED_TENSORS, "none"): "there is nothing to quantize; choose a quantization.algo",
    (HF_MODELOPT, "w4a16"): "ModelOpt writes no per-channel INT4 checkpoint; use w4a16_awq (TensorRT-LLM) or target "
                            "hf-compressed-tensors (vLLM)",
    (HF_COMPRESSED_TENSORS, "fp8"): "this release writes FP8 only as hf-modelopt, which both TensorRT-LLM's PyTorch "
                                    "backend and vLLM load; use output.targets: [hf-modelopt]",
    (HF_COMPRESSED_TENSORS, "w8a8_sq_per_tensor"): "vLLM's compressed-tensors W8A8 takes per-channel weight scales; use "
                                                   "w8a8_sq_per_channel (static) or w8a8_sq_per_channel_per_token "
                                                   "(dynamic)",
}
_SMOOTHQUANT = ("w8a8_sq_per_channel", "w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor")
for _algo in _SMOOTHQUANT:
    _REJECTED[(HF_MODELOPT, _algo)] = (
        f"{TRTLLM_PYTORCH} rejects SmoothQuant (W8A8_SQ_* matches none of its linear methods: 'unsupported "
        "quant mode') and vLLM's modelopt loader accepts only FP8/NVFP4 quant_algo; use target "
        "hf-compressed-tensors (vLLM int8 W8A8), or algo fp8 / w8a16 / w4a16_awq for TensorRT-LLM")


def consumers(target: str, algo: str) -> tuple[str, ...]:
    """The consumers that load `target` written with `algo` (empty when none does)."""
    return _LOADERS.get(target, {}).get(algo, ())


def target_findings(recipe: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, message) for every target the recipe's quantization cannot be written for."""
    targets = list(recipe.get("output", {}).get("targets", DEFAULT_TARGETS))
    quant = recipe["quantization"]
    algo, kv = quant["algo"], quant["kv_cache"]
    hf = [t for t in targets if t in HF_TARGETS]
    if algo == "nvfp4" and TRTLLM_CHECKPOINT in targets:
        yield "output.targets", ("algo nvfp4 is written only as a Hugging Face checkpoint (trtllm-build's checkpoint "
                                 "path is not implemented for it); use output.targets: [hf-modelopt] (TensorRT-LLM "
                                 "PyTorch backend, vLLM) and/or hf-compressed-tensors (vLLM)")
    for target in hf:
        if consumers(target, algo):
            continue
        reason = _REJECTED.get((target, algo), "no consumer loads this combination")
        yield "quantization.algo", f"output target {target} with algo {algo}: {reason}"
    if hf and kv == "int8":
        yield "quantization.kv_cache", (f"output targets {', '.join(hf)}: an INT8 KV cache has no scales in these "
                                        "formats (vLLM and TensorRT-LLM's PyTorch backend read FP8 KV scales); use "
                                        "kv_cache: fp8 or none")
    if hf and list(quant["exclude_modules"]) not in (["lm_head"], []):
        yield "quantization.exclude_modules", (f"output targets {', '.join(hf)} quantize every decoder linear and keep "
                                               "lm_head unquantized; per-module exclusion is not supported for them "
                                               "yet: use exclude_modules: [lm_head]")
    if TRTLLM_CHECKPOINT not in targets:
        # verify checks every target it finds (trtllm-checkpoint and the HF exports alike)
        if recipe.get("engine"):
            yield "engine", ("an engine is built from the trtllm-checkpoint target, which output.targets does not "
                             "list; add trtllm-checkpoint to output.targets or remove engine")
