"""Output targets and what their consumers load (docs/format/hf-quantized-checkpoint.md §2, §3, read from
TensorRT-LLM's and vLLM's source; no consumer was run).

  trtllm-checkpoint      the legacy TensorRT-LLM checkpoint (shard stage) for trtllm-build
  hf-modelopt            ModelOpt unified HF: TensorRT-LLM PyTorch backend (LLM API, trtllm-serve)
                         and vLLM's modelopt / modelopt_fp4 loaders
  hf-compressed-tensors  llm-compressor's format: vLLM's compressed-tensors loader
"""
from __future__ import annotations

from typing import Any, Mapping

from recipe_runner.quant.algorithms import (ALGORITHMS, HF_COMPRESSED_TENSORS, HF_MODELOPT, KV_CACHES,
                                           TRTLLM_CHECKPOINT, TRTLLM_PYTORCH, VLLM, quantizes)

HF_TARGETS = (HF_MODELOPT, HF_COMPRESSED_TENSORS)
DEFAULT_TARGETS = (TRTLLM_CHECKPOINT,)

# Which algo each HF target is written for, the consumers that load it and why the others are refused:
# each Algorithm's hf_loaders / hf_refusals (quant/algorithms.py). "none" with kv_cache fp8 is the KV-only
# checkpoint: unquantized linears plus k_scale/v_scale.


def output_targets(recipe: Mapping[str, Any]) -> list[str]:
    """The targets a recipe's data writes (output.targets, or the default)."""
    return list(recipe.get("output", {}).get("targets", DEFAULT_TARGETS))


def consumers(target: str, algo: str, kv_cache: str = "none") -> tuple[str, ...]:
    """The consumers that load `target` written with `algo` and `kv_cache` (empty when none does)."""
    if not quantizes(algo, kv_cache):
        return ()
    return ALGORITHMS[algo].hf_loaders.get(target, ())


def hf_targets(recipe: Mapping[str, Any]) -> list[str]:
    return [t for t in output_targets(recipe) if t in HF_TARGETS]


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
        if KV_CACHES[kv].hf_kv_algo and TRTLLM_PYTORCH in loaders:
            notes.append(f"{target}: {TRTLLM_PYTORCH} runs an FP8 KV cache with scale 1.0 and ignores the written "
                         "k_scale/v_scale (vLLM uses them)")
    return notes
