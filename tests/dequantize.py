"""Test-only inverses of the package's quantizers and packers (moved out of recipe_runner, issue 15):
the tests decode what the package wrote and compare it with the float weights."""
from __future__ import annotations

import torch


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes × their per-tensor dequantization scale (quant/fp8.py)."""
    return codes.float() * scale.float().reshape(())


def dequantize_int8(weight) -> torch.Tensor:
    """A smoothquant.Int8Weight (scale [out] per channel or [1] per tensor) back to float32."""
    scale = weight.scale if weight.scale.numel() == 1 else weight.scale[:, None]
    return weight.codes.float() * scale


def unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of the compressed-tensors pack-quantized packing (quant/packing.py pack_int32):
    signed codes [out, in] (int8)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    u = (words.to(torch.int64)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).reshape(words.shape[0], -1).to(torch.int8)
