"""FP8 E4M3 per-tensor quantization.

Scales are dequantization scales: scale = amax / 448 (448 is E4M3's largest finite value), for
weights (amax of the weight) and activations (amax from calibration). TensorRT-LLM's FP8Linear
computes x_q = fp8(x / act_scale), w_q = fp8(W / w_scale), y = (x_q·act_scale)(w_q·w_scale)ᵀ.
"""
from __future__ import annotations

import torch

from recipe_runner.quant.chunks import map_row_chunks, scratch

E4M3_MAX = 448.0
MIN_AMAX = torch.finfo(torch.float32).tiny


def fp8_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """float32 [1] dequantization scale for values with this absolute maximum."""
    value = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    return (value.clamp(min=MIN_AMAX) / E4M3_MAX).reshape(1)


def quantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes (round to nearest even, saturated at ±448). A matrix goes row chunk by row
    chunk (quant/chunks.py, on every core) through one reused float32 buffer per thread (no float32 copy
    of the whole weight)."""
    s = scale.float().reshape(())
    if weight.dim() != 2:
        return (weight.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)

    def chunk(rows: slice) -> None:
        part = weight[rows].float()
        q = torch.div(part, s, out=scratch("fp8", part.shape, torch.float32, weight.device))
        codes[rows].copy_(q.clamp_(-E4M3_MAX, E4M3_MAX))

    map_row_chunks(chunk, *weight.shape, weight.device)
    return codes
