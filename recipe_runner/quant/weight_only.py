"""Symmetric per-output-channel weight-only quantization (W8A16 / W4A16).

scale[o] = max|W[o, :]| / qmax with qmax = 127 (int8) or 7 (int4); codes = clamp(round(W / scale),
qmin, qmax). This is what TensorRT-LLM's build-time weight-only quantizer computes; the quantize
stage records these scales so that verify can simulate the rounding before an engine exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recipe_runner.quant.chunks import map_row_chunks, scratch
from recipe_runner.quant.reductions import absmax

# Smallest scale used for an all-zero channel (its codes are then all 0, dequantizing exactly).
MIN_SCALE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class IntFormat:
    bits: int
    qmin: int
    qmax: int


INT8 = IntFormat(8, -128, 127)
INT4 = IntFormat(4, -8, 7)
FORMATS = {8: INT8, 4: INT4}


def per_channel_scales(weight: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """float32 [out]: row amax / qmax."""
    amax = absmax(weight.float(), dim=1)
    return (amax / fmt.qmax).clamp(min=MIN_SCALE)


def quantize_per_channel(weight: torch.Tensor, scales: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """int8 codes [out, in] (int4 codes are int8 values in [-8, 7], not yet packed)."""
    q = weight.float() / scales.float()[:, None]
    return q.round_().clamp_(fmt.qmin, fmt.qmax).to(torch.int8)


def int_codes(weight: torch.Tensor, scale: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """int8 codes [out, in] = clamp(round(W / scale)) for a float32 `weight` and a dequantization `scale`
    per tensor (0-dim), per channel [out] or per group of inputs [out, in/group]. Row chunks on every
    core keep the float32 temporaries small (quant/chunks.py)."""
    out_dim, in_dim = weight.shape
    s = scale.float().expand(out_dim) if scale.dim() == 0 else scale.float()
    s = s.reshape(out_dim, -1)
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)

    def chunk(rows: slice) -> None:
        part = weight[rows].reshape(-1, s.shape[1], in_dim // s.shape[1])
        # one chunk's float32 quotients in this thread's reused buffer: no fresh memory to fault in per chunk
        q = torch.div(part, s[rows, :, None], out=scratch("int_codes", part.shape, torch.float32, weight.device))
        codes[rows].copy_(q.round_().clamp_(fmt.qmin, fmt.qmax).reshape(-1, in_dim))  # copy_ casts, as .to does

    map_row_chunks(chunk, out_dim, in_dim, weight.device)
    return codes


def dequantize_per_channel(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales.float()[:, None]


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weight a W8A16 (bits=8) or W4A16 (bits=4) engine effectively multiplies by."""
    fmt = FORMATS[bits]
    scales = per_channel_scales(weight, fmt)
    return dequantize_per_channel(quantize_per_channel(weight, scales, fmt), scales)
