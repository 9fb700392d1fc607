"""Quantization arithmetic as TensorRT-LLM performs it, simulated in float32.

Conventions (TensorRT's): a *dequant* scale s maps integers back to reals, x ≈ q·s, and
quantizing divides: q = clamp(round(x / s)). SmoothQuant-plugin `scale_to_int` factors are the
inverse (quant scales: q = round(x · scale)). Activations round half to even (CUDA's
__float2int_rn); trtllm-build's CPU weight quantizer rounds half away from zero (std::round).
"""
from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128.0, 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def fake_int8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize to int8 with dequant scale `scale` and back."""
    return torch.clamp(torch.round(x / scale), INT8_MIN, INT8_MAX) * scale


def fake_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize to float8_e4m3fn with dequant scale `scale` (saturating) and back."""
    scaled = torch.clamp(x / scale, -FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn).to(torch.float32) * scale


def int8_from_quant_scale(x: torch.Tensor, quant_scale: torch.Tensor | float) -> torch.Tensor:
    """SmoothQuant plugin input quantization: the int8 values of round(x · quant_scale), as floats."""
    return torch.clamp(torch.round(x * quant_scale), INT8_MIN, INT8_MAX)


def fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token int8 (SmoothQuant *_PER_TOKEN): each row gets scale amax(row)/127."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return fake_int8(x, scale)


def simulate_weight_only(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """What trtllm-build's weight-only quantizer (symmetric_quantize in cutlass_preprocessors.cpp)
    makes of a float weight [out, in] for W8A16 (bits=8) / W4A16 (bits=4), dequantized.

    Per output channel: scale = amax / 2^(bits-1) (128 or 8, not 127 or 7: the largest magnitude
    lands on the clamp), q = clamp(round_half_away(w / scale), -2^(bits-1), 2^(bits-1)-1); the
    GEMM multiplies q by the scale stored in the model dtype.
    """
    w = weight.to(torch.float32)
    levels = float(1 << (bits - 1))
    scale = w.abs().amax(dim=1, keepdim=True) / levels
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(round_half_away(w / safe), -levels, levels - 1)
    q = torch.where(scale == 0, torch.zeros_like(q), q)
    return q * scale.to(weight.dtype).to(torch.float32)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt AWQ packing: int8 [out/2, in], row 2k in the low nibble and row 2k+1 in the high
    nibble, each a signed 4-bit value → int values [out, in] as float32."""
    p = packed.to(torch.int16)  # widen so the shifts below sign-extend each nibble
    low = ((p & 0x0F) ^ 0x08) - 0x08
    high = (((p >> 4) & 0x0F) ^ 0x08) - 0x08
    out = torch.stack([low, high], dim=1)  # [out/2, 2, in]: rows 2k, 2k+1 interleaved
    return out.reshape(-1, packed.shape[1]).to(torch.float32)

