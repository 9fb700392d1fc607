"""KV-cache scales: one float32 [1] dequantization scale per layer (`kv_cache_scaling_factor`).

INT8 follows TensorRT-LLM's own LLaMA converter (docs/format/trtllm-checkpoint.md §4.3): max over
the q, k and v projection outputs of |y|, divided by 127 (it includes q's range, which makes the
scale conservative). FP8 follows ModelOpt (the producer of calibrated FP8 KV scales): max |k|, |v|
projection outputs / 448. Both use the projection outputs before RoPE, as the TensorRT-LLM
converter's hooks see them.
"""
from __future__ import annotations

import torch

from recipe_runner.quant.fp8 import E4M3_MAX, MIN_AMAX

INT8_MAX = 127.0


def kv_cache_scale(kind: str, q_amax: float, k_amax: float, v_amax: float) -> torch.Tensor:
    """kind "int8" or "fp8"; amaxes are the max |output| of q_proj, k_proj, v_proj."""
    if kind == "int8":
        amax, qmax = max(q_amax, k_amax, v_amax), INT8_MAX
    elif kind == "fp8":
        amax, qmax = max(k_amax, v_amax), E4M3_MAX
    else:
        raise ValueError(f"unknown KV cache quantization {kind!r}")
    return torch.tensor([max(amax, MIN_AMAX) / qmax], dtype=torch.float32)
