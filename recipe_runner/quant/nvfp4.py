"""NVFP4 (W4A4): E2M1 values, FP8 E4M3 scales per block of 16 input channels, one fp32 global scale.

Formulas (docs/format/hf-quantized-checkpoint.md §1.4, ModelOpt's NVFP4QTensor, bit-exact there):
    ws2          = amax / (6·448)                     shared (max) across q/k/v and across gate/up
    weight_scale = e4m3(clamp(blockamax16 / (6·ws2), 2⁻⁹, 448))            [out, in/16]
    codes        = e2m1(W / (f32(weight_scale)·ws2))  round to nearest, ties to the even code
    W           ≈ e2m1_value(codes) · f32(weight_scale) · ws2
A code is sign·bit3 plus a magnitude index 0..7 → {0, 0.5, 1, 1.5, 2, 3, 4, 6}; two codes per byte
along the input dim, element 2j in the low nibble. Everything is computed in float32 on CPU.
"""
from __future__ import annotations

import torch

from recipe_runner.quant.chunks import row_slices

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
MIN_BLOCK_SCALE = 2.0 ** -9
MIN_AMAX = torch.finfo(torch.float32).tiny
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def global_scale(amax: float) -> torch.Tensor:
    """float32 0-dim ws2 (weights) or input_scale (activations) for this absolute maximum."""
    return torch.tensor(max(float(amax), MIN_AMAX) / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    out, inp = weight.shape
    if inp % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension ({inp}) to be a multiple of {BLOCK}")
    return weight.float().reshape(out, inp // BLOCK, BLOCK)


def block_scales(weight: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [out, in/16]."""
    amax = torch.cat([_blocks(weight[rows]).abs().amax(dim=2) for rows in row_slices(*weight.shape)])
    return (amax / (E2M1_MAX * ws2.float())).clamp(MIN_BLOCK_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (bit 3 = sign) of float32 `x`, saturated at ±6, ties to the even code.

    The magnitudes are evenly spaced within [0, 2] (step 0.5), [2, 4] (step 1) and [4, 6] (step 2),
    so rounding to the nearest step with round-half-to-even picks the nearest value and, on a tie,
    the even code (each range's even steps are even codes)."""
    mag = x.abs().clamp_(max=E2M1_MAX)
    idx = torch.where(mag < 2, (mag * 2).round_(), torch.where(mag < 4, mag.round() + 2, (mag / 2).round_() + 4))
    codes = idx.to(torch.uint8)
    codes |= ((x < 0) & (codes > 0)).to(torch.uint8) << 3
    return codes


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 codes 0..15 (bit 3 = sign), on the codes' device."""
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def quantize(weight: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] (unpacked) of `weight` with these block scales and global scale."""
    denom = scales.float() * ws2.float()
    codes = torch.empty(weight.shape, dtype=torch.uint8)
    for rows in row_slices(*weight.shape):
        codes[rows] = e2m1_codes(_blocks(weight[rows]) / denom[rows, :, None]).reshape(codes[rows].shape)
    return codes


def dequantize(codes: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    out, inp = codes.shape
    vals = e2m1_values(codes).reshape(out, inp // BLOCK, BLOCK)
    return (vals * scales.float()[:, :, None] * ws2.float()).reshape(out, inp)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] codes -> uint8 [out, in/2]: element 2j low nibble, 2j+1 high nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out
