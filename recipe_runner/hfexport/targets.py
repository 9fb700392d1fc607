"""Output targets and what their consumers load (hf-quantized-checkpoint spec §2, §3, read from
TensorRT-LLM's and vLLM's source; no consumer was run).

  trtllm-checkpoint      the legacy TensorRT-LLM checkpoint (shard stage) for trtllm-build
  hf-modelopt            ModelOpt unified HF: TensorRT-LLM PyTorch backend (LLM API, trtllm-serve)
                         and vLLM's modelopt / modelopt_fp4 loaders
  hf-compressed-tensors  llm-compressor's format: vLLM's compressed-tensors loader
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from recipe_runner.stages.registry import STAGES

TRTLLM_CHECKPOINT = "trtllm-checkpoint"
HF_MODELOPT = "hf-modelopt"
HF_COMPRESSED_TENSORS = "hf-compressed-tensors"
HF_TARGETS = (HF_MODELOPT, HF_COMPRESSED_TENSORS)
DEFAULT_TARGETS = (TRTLLM_CHECKPOINT,)
# the stage that writes each HF target (stages/registry.py)
EXPORT_STAGES = {spec.target: name for name, spec in STAGES.items() if spec.target in HF_TARGETS}

TRTLLM_PYTORCH = "TensorRT-LLM's PyTorch backend"
VLLM = "vLLM"

# target -> algo -> the consumers that load it (empty: none does; the reason says what to use).
# "none" with kv_cache fp8 is the KV-only checkpoint: unquantized linears plus k_scale/v_scale.
_LOADERS: dict[str, dict[str, tuple[str, ...]]] = {
    HF_MODELOPT: {"fp8": (TRTLLM_PYTORCH, VLLM), "nvfp4": (TRTLLM_PYTORCH, VLLM),
                  "w4a16_awq": (TRTLLM_PYTORCH,), "w8a16": (TRTLLM_PYTORCH,), "none": (TRTLLM_PYTORCH,)},
    HF_COMPRESSED_TENSORS: {"w8a16": (VLLM,), "w4a16": (VLLM,), "w4a16_awq": (VLLM,), "nvfp4": (VLLM, TRTLLM_PYTORCH),
                            "w8a8_sq_per_channel": (VLLM,), "w8a8_sq_per_channel_per_token": (VLLM,)},
}
_REJECTED: dict[tuple[str, str], str] = {
    (HF_COMPRESSED_TENSORS, "none"): "this release writes no compressed-tensors checkpoint without quantized "
                                     "weights; choose a quantization.algo, or target hf-modelopt for a KV-only "
                                     "checkpoint (TensorRT-LLM's PyTorch backend)",
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


def output_targets(recipe: Mapping[str, Any]) -> list[str]:
    """The targets a recipe's data writes (output.targets, or the default)."""
    return list(recipe.get("output", {}).get("targets", DEFAULT_TARGETS))


def consumers(target: str, algo: str, kv_cache: str = "none") -> tuple[str, ...]:
    """The consumers that load `target` written with `algo` and `kv_cache` (empty when none does)."""
    if algo == "none" and kv_cache == "none":
        return ()
    return _LOADERS.get(target, {}).get(algo, ())


def target_findings(recipe: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, message) for every target the recipe's quantization cannot be written for."""
    targets = output_targets(recipe)
    quant = recipe["quantization"]
    algo, kv = quant["algo"], quant["kv_cache"]
    hf = [t for t in targets if t in HF_TARGETS]
    if algo == "nvfp4" and TRTLLM_CHECKPOINT in targets:
        yield "output.targets", ("algo nvfp4 is written only as a Hugging Face checkpoint (trtllm-build's checkpoint "
                                 "path is not implemented for it); use output.targets: [hf-modelopt] (TensorRT-LLM "
                                 "PyTorch backend, vLLM) and/or hf-compressed-tensors (vLLM)")
    for target in hf:
        if consumers(target, algo, kv):
            continue
        reason = _REJECTED.get((target, algo), "no consumer loads this combination")
        if algo == "none" and kv == "none":
            reason = ("there is nothing to quantize (the source loads as it is); choose a quantization.algo, or "
                      "kv_cache: fp8 for a KV-only hf-modelopt checkpoint")
        yield "quantization.algo", f"output target {target} with algo {algo}: {reason}"
    if hf and kv == "int8":
        yield "quantization.kv_cache", (f"output targets {', '.join(hf)}: an INT8 KV cache has no scales in these "
                                        "formats (vLLM and TensorRT-LLM's PyTorch backend read FP8 KV scales); use "
                                        "kv_cache: fp8 or none")
    if TRTLLM_CHECKPOINT not in targets:
        # verify checks every target it finds (trtllm-checkpoint and the HF exports alike)
        if recipe.get("engine"):
            yield "engine", ("an engine is built from the trtllm-checkpoint target, which output.targets does not "
                             "list; add trtllm-checkpoint to output.targets or remove engine")


def hf_targets(recipe: Mapping[str, Any]) -> list[str]:
    return [t for t in output_targets(recipe) if t in HF_TARGETS]


def _width_rules(target: str, algo: str, group_size: int, legacy: bool) -> list[tuple[int, str, str]]:
    """(multiple, why, recipe field): what the input width of every quantized projection must divide into."""
    rules = []
    if algo == "nvfp4":
        rules.append((16, "NVFP4 scales blocks of 16 inputs", "quantization.algo"))
    if algo == "w4a16_awq" and not legacy:  # the trtllm-checkpoint rule (group_size x tp_size) is stricter
        rules.append((group_size, f"group_size={group_size} groups the inputs", "quantization.group_size"))
    if target == HF_COMPRESSED_TENSORS and algo in ("w4a16", "w4a16_awq", "w8a16"):
        per = 8 if algo != "w8a16" else 4
        rules.append((per, f"pack-quantized packs {per} codes along the inputs into each int32", "quantization.algo"))
    return rules


def model_findings(model, recipe: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Plan-time checks of the HF targets against the source model's shapes (`model` is a
    hf.config.ModelConfig): widths the formats pack or scale in blocks, and fused groups the
    exclude patterns would split."""
    from recipe_runner.hfexport.exclusion import partial_fused_groups

    quant = recipe["quantization"]
    targets = hf_targets(recipe)
    if not targets or (quant["algo"] == "none" and quant["kv_cache"] == "none"):
        return
    widths = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
              "num_attention_heads x head_dim": model.num_attention_heads * model.head_dim}
    legacy = TRTLLM_CHECKPOINT in output_targets(recipe)
    for target in targets:
        for multiple, why, field in _width_rules(target, quant["algo"], quant["group_size"], legacy):
            for name, width in widths.items():
                if width % multiple:
                    yield field, (f"output target {target} with algo {quant['algo']}: the model's {name}={width} "
                                  f"(an input width of its linears) is not a multiple of {multiple} ({why}); "
                                  "use another algo or group size")
                    break
    for problem in partial_fused_groups(list(quant["exclude_modules"]), model.num_hidden_layers):
        yield "quantization.exclude_modules", f"output targets {', '.join(targets)}: {problem}"
        break


def target_notes(recipe: Mapping[str, Any]) -> list[str]:
    """Which consumers load each HF target the recipe writes (shown by `recipe plan`)."""
    quant = recipe["quantization"]
    algo, kv = quant["algo"], quant["kv_cache"]
    notes = []
    for target in hf_targets(recipe):
        loaders = consumers(target, algo, kv)
        if not loaders:
            continue
        others = [c for c in (TRTLLM_PYTORCH, VLLM) if c not in loaders]
        notes.append(f"{target} ({algo}{', kv_cache ' + kv if kv != 'none' else ''}) loads in {' and '.join(loaders)}"
                     + (f"; {' and '.join(others)} refuses it" if others else ""))
        if kv == "fp8" and TRTLLM_PYTORCH in loaders:
            notes.append(f"{target}: {TRTLLM_PYTORCH} runs an FP8 KV cache with scale 1.0 and ignores the written "
                         "k_scale/v_scale (vLLM uses them)")
    return notes
