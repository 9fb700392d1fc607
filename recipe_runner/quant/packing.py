"""Two signed 4-bit values per byte, packed along the output (row) dimension.

Layout (docs/format/verified-layouts.md, ModelOpt's W4A16_AWQ export for TensorRT-LLM): an int4 matrix
[out, in] becomes int8 [out/2, in]; row 2k goes in the low nibble and row 2k+1 in the high nibble
of packed row k, each as 4-bit two's complement. Packing along rows keeps a tensor-parallel split
of the output dimension a plain row slice of the packed tensor (out/tp is even).
"""
from __future__ import annotations

import math

import torch

from recipe_runner.quant.chunks import map_row_chunks

INT4_MIN, INT4_MAX = -8, 7


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] of shape [out, ...] (out even) -> int8 [out/2, ...]; row chunks on every core."""
    if codes.dtype != torch.int8:
        raise TypeError(f"int4 codes must be int8, got {codes.dtype}")
    if codes.shape[0] % 2:
        raise ValueError(f"cannot pack {codes.shape[0]} rows two per byte: the row count must be even")
    if codes.numel():
        low, high = torch.aminmax(codes)
        if int(low) < INT4_MIN or int(high) > INT4_MAX:
            raise ValueError("int4 codes must lie in [-8, 7]")
    width = math.prod(codes.shape[1:])
    pairs = codes.reshape(codes.shape[0] // 2, 2 * width)  # packed row k: rows 2k and 2k+1 side by side
    packed = torch.empty((codes.shape[0] // 2, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    flat = packed.view(packed.shape[0], width)

    def chunk(rows: slice) -> None:
        nibbles = pairs[rows].view(torch.uint8) & 0x0F  # two's complement low 4 bits
        torch.bitwise_or(nibbles[:, :width], nibbles[:, width:] << 4, out=flat[rows])

    map_row_chunks(chunk, pairs.shape[0], pairs.shape[1], codes.device)
    return packed.view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4_rows: int8 [out/2, ...] -> int8 codes [out, ...] in [-8, 7]."""
    if packed.dtype != torch.int8:
        raise TypeError(f"packed int4 must be int8, got {packed.dtype}")
    byte = packed.view(torch.uint8).to(torch.int16)
    low, high = byte & 0x0F, (byte >> 4) & 0x0F
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    out = torch.empty((packed.shape[0] * 2, *packed.shape[1:]), dtype=torch.int8)
    out[0::2] = low.to(torch.int8)
    out[1::2] = high.to(torch.int8)
    return out


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors pack-quantized: signed codes [out, in] → int32 [out, in·bits/32], each stored as
    code + 2^(bits-1), element k of a word at bit k·bits (packed along the inputs, unlike the above)."""
    out_dim, in_dim = codes.shape
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = torch.empty((out_dim, in_dim // per), dtype=torch.int32, device=codes.device)

    def chunk(rows: slice) -> None:
        unsigned = (codes[rows].to(torch.int64) + (1 << (bits - 1))).reshape(-1, in_dim // per, per)
        packed = (unsigned << shifts).sum(dim=2)
        words[rows] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)

    map_row_chunks(chunk, out_dim, in_dim, codes.device)
    return words
