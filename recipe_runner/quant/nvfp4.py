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

from recipe_runner.quant.chunks import map_row_chunks, scratch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
MIN_BLOCK_SCALE = 2.0 ** -9
MIN_AMAX = torch.finfo(torch.float32).tiny
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def global_scale(amax: float) -> torch.Tensor:
    """float32 0-dim ws2 (weights) or input_scale (activations) for this absolute maximum."""
    return torch.tensor(max(float(amax), MIN_AMAX) / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)


def _check_blocks(inp: int) -> None:
    if inp % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension ({inp}) to be a multiple of {BLOCK}")


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    out, inp = weight.shape
    _check_blocks(inp)
    return weight.float().reshape(out, inp // BLOCK, BLOCK)


def block_scales(weight: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [out, in/16]."""
    out, inp = weight.shape
    _check_blocks(inp)
    amax = torch.empty((out, inp // BLOCK), dtype=torch.float32, device=weight.device)
    map_row_chunks(lambda rows: torch.amax(_blocks(weight[rows]).abs(), dim=2, out=amax[rows]), out, inp,
                   weight.device)
    return (amax / (E2M1_MAX * ws2.float())).clamp(MIN_BLOCK_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def _e2m1_rounding(x: torch.Tensor) -> torch.Tensor:
    """The definition of e2m1_codes (its lookup table is built from this and tested against it).

    The magnitudes are evenly spaced within [0, 2] (step 0.5), [2, 4] (step 1) and [4, 6] (step 2),
    so rounding to the nearest step with round-half-to-even picks the nearest value and, on a tie,
    the even code (each range's even steps are even codes). NaN gives 0 (its uint8 cast, on x86)."""
    mag = x.abs().clamp_(max=E2M1_MAX)
    idx = torch.where(mag < 2, (mag * 2).round_(), torch.where(mag < 4, mag.round() + 2, (mag / 2).round_() + 4))
    codes = idx.to(torch.uint8)
    codes |= ((x < 0) & (codes > 0)).to(torch.uint8) << 3
    return codes


# E2M1 codes by table lookup on the float32 bits. Every tie of the rounding (0.25, 0.75, ..., 5.0) and
# every other point where _e2m1_rounding changes (2, 4, 6, inf, NaN) has at most 2 mantissa bits, so it
# is the first value of a bucket of 2^21 consecutive bit patterns (a bucket: the top 10 of |x|'s 31
# bits, the exponent and 2 mantissa bits). Inside a bucket the code is constant; at its first value it
# can differ (a tie goes to the even code, so it joins the values below it or those above it). Index 2k
# holds the code of bucket k's first value and 2k+1 that of the rest of it: for magnitude bits m,
# (m >> 21) + ((m - 1) >> 21) + 1 is 2k at m = k·2^21 and 2k+1 above it (m - 1 never overflows; m = 0
# gives 0); negative x use the second half, whose magnitude-0 entries are 0 (no sign bit).
_BUCKET_SHIFT = 21
_SIGN_OFFSET = 2 << (31 - _BUCKET_SHIFT)  # 2048: entries per sign


def _e2m1_table() -> torch.Tensor:
    k = torch.arange(_SIGN_OFFSET // 2, dtype=torch.int64) << _BUCKET_SHIFT
    starts = torch.stack([k, k + 1], dim=1).reshape(-1)  # bucket k's first bit pattern, then its second
    mags = starts.to(torch.int32).view(torch.float32)
    table = torch.cat([_e2m1_rounding(mags), _e2m1_rounding(-mags)])
    table[mags.isnan().repeat(2)] = 0  # NaN: 0, what _e2m1_rounding's uint8 cast gives on x86, defined here
    return table


_E2M1_TABLE = _e2m1_table()  # uint8 [4096]
_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return _E2M1_TABLE
    if device not in _TABLES:
        _TABLES[device] = _E2M1_TABLE.to(device)
    return _TABLES[device]


def e2m1_codes(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes 0..15 (bit 3 = sign) of float32 `x`, saturated at ±6, ties to the even code: exactly
    _e2m1_rounding's, by one lookup in a 4 KiB table (about 4 x less CPU than its chain of where/round).
    `out`: a contiguous uint8 tensor with as many elements as x to write them into (in x's order).
    float64 goes through _e2m1_rounding (a float32 cast could move a value onto a tie); the other float
    types are exact in float32."""
    if x.dtype == torch.float64:
        codes = _e2m1_rounding(x)
        return codes if out is None else out.copy_(codes)
    bits = x.float().contiguous().view(torch.int32).reshape(-1)
    idx = torch.bitwise_and(bits, 0x7FFFFFFF, out=scratch("e2m1_idx", bits.shape, torch.int32, x.device))
    below = torch.sub(idx, 1, out=scratch("e2m1_below", bits.shape, torch.int32, x.device))
    idx >>= _BUCKET_SHIFT
    below >>= _BUCKET_SHIFT
    idx += below
    torch.bitwise_right_shift(bits, 31, out=below)  # -1 for a set sign bit, else 0
    below &= _SIGN_OFFSET
    below |= 1
    idx += below
    if out is None:
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    torch.index_select(_table(x.device), 0, idx, out=out.view(-1))
    return out


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 codes 0..15 (bit 3 = sign), on the codes' device."""
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def quantize(weight: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] (unpacked) of `weight` with these block scales and global scale."""
    out, inp = weight.shape
    _check_blocks(inp)
    denom = scales.float() * ws2.float()
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)

    def chunk(rows: slice) -> None:
        blocks = _blocks(weight[rows])
        q = torch.div(blocks, denom[rows, :, None], out=scratch("nvfp4_q", blocks.shape, torch.float32, weight.device))
        e2m1_codes(q, out=codes[rows])

    map_row_chunks(chunk, out, inp, weight.device)
    return codes


def dequantize(codes: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    out, inp = codes.shape
    vals = e2m1_values(codes).reshape(out, inp // BLOCK, BLOCK)
    return (vals * scales.float()[:, :, None] * ws2.float()).reshape(out, inp)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] codes -> uint8 [out, in/2]: element 2j low nibble, 2j+1 high nibble."""
    out, inp = codes.shape
    packed = torch.empty((out, inp // 2), dtype=torch.uint8, device=codes.device)

    def chunk(rows: slice) -> None:
        torch.bitwise_or(codes[rows, 0::2], codes[rows, 1::2] << 4, out=packed[rows])

    map_row_chunks(chunk, out, inp, codes.device)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out
