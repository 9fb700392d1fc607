"""One projection of a quantized Hugging Face checkpoint, read and dequantized the way its consumer
computes it, in float32 (used by recipe_runner.reference.hf_quantized, layer by layer):

| format (quant_algo / compressed-tensors format) | per projection (besides bias) | simulated here |
|---|---|---|
| modelopt FP8        | weight f8, weight_scale [], input_scale []           | w·s; x fake-quantized to FP8 with input_scale |
| modelopt W8A16      | weight int8 [o,i], weight_scale [o]                  | q·s |
| modelopt W4A16_AWQ  | weight uint8 [o/2,i] (int4 along out, row 2k low nibble), weight_scale [o,i/g], pre_quant_scale [i] (o_proj, down_proj; q/k/v and gate/up have it folded into the norm) | (x·pqs)·(q·s)ᵀ |
| modelopt NVFP4      | weight uint8 [o,i/2] (E2M1 along in, element 2j low nibble), weight_scale e4m3 [o,i/16], weight_scale_2 [], input_scale [] | e2m1·bs·ws2; x quantized to NVFP4 per 16 with global scale input_scale |
| ct pack-quantized   | weight_packed int32 [o, i·bits/32] (code+2^(bits-1), element k at bit k·bits), weight_scale [o,1] or [o,i/g], weight_shape | q·s |
| ct int-quantized    | weight int8, weight_scale [o,1], input_scale [1] (static) | q·s; x fake-quantized to int8 per tensor (static) or per token (dynamic) |
| ct nvfp4-pack-quantized | weight_packed uint8 [o,i/2], weight_scale e4m3 [o,i/16], weight_global_scale [1] = 1/ws2, input_global_scale [1] = 1/input_scale | as NVFP4 |
| FP8 KV cache (both) | k_proj.k_scale [], v_proj.v_scale []                 | K (after rope) and V fake-quantized to FP8 |
| modelopt KV-only (quant_algo null) | weight in the model dtype          | w, with the FP8 KV cache |

The weight layouts are read here independently of the exporter (hfexport/export.py): a packing or
scale mistake there shows up in the logits instead of being undone by shared code. Only the
activation rounding reuses quant/nvfp4.py's E2M1 arithmetic. Facts from
docs/format/hf-quantized-checkpoint.md §1.3, §1.4, §2.3, §3, copied.
"""
from __future__ import annotations

from typing import Callable

import torch

from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.quant import nvfp4
from recipe_runner.reference import numerics as nx
from recipe_runner.reference.hf_quant_format import HF_COMPRESSED_TENSORS, NVFP4_BLOCK, HFCheckpointError, HFQuantFormat
from recipe_runner.reference.linear import RankLinear


# ---- dequantization -----------------------------------------------------------------------------

def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """uint8/int8 [out/2, in], row 2k low nibble, 2k+1 high, signed → [out, in] float32."""
    p = packed.view(torch.uint8).to(torch.int16)
    low, high = p & 0x0F, p >> 4
    low, high = torch.where(low >= 8, low - 16, low), torch.where(high >= 8, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1]).to(torch.float32)


def unpack_int32_words(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """pack-quantized int32 [out, in·bits/32] → signed codes [out, in] float32."""
    per = 32 // bits
    u = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = ((u[:, :, None] >> shifts) & ((1 << bits) - 1)) - (1 << (bits - 1))
    return codes.reshape(words.shape[0], -1)[:, :in_features].to(torch.float32)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2], element 2j low nibble → E2M1 values [out, in] float32."""
    return nvfp4.e2m1_values(torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1))


def fake_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation quantization: per 16 inputs an E4M3 block scale over the fp32 global scale."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    scales = nvfp4.block_scales(flat, global_scale)
    return nvfp4.dequantize(nvfp4.quantize(flat, scales, global_scale), scales, global_scale).reshape(shape)


class Tensors:
    """The tensors of one projection (named by `prefix`) of a checkpoint; `need` says what is missing."""

    def __init__(self, reader: SourceCheckpoint, prefix: str, fmt: HFQuantFormat):
        self.reader, self.prefix, self.fmt = reader, prefix, fmt

    def get(self, suffix: str) -> torch.Tensor | None:
        name = self.prefix + suffix
        return self.reader.read(name) if name in self.reader else None

    def need(self, suffix: str) -> torch.Tensor:
        name = self.prefix + suffix
        if name not in self.reader:
            raise HFCheckpointError(f"{self.reader.model_dir}: tensor '{name}' is missing; {self.fmt.target} "
                                    f"{self.fmt.quant_algo or 'unquantized'} needs it")
        return self.reader.read(name)

    def fail(self, suffix: str, why: str) -> HFCheckpointError:
        return HFCheckpointError(f"{self.reader.model_dir}: {self.prefix}{suffix}: {why}")


def scalar(t: Tensors, suffix: str) -> torch.Tensor:
    value = t.need(suffix).to(torch.float32)
    if value.numel() != 1:
        raise t.fail(suffix, f"has shape {list(value.shape)}; expected one value")
    return value.reshape(())


def quantized_linear(fmt: HFQuantFormat, t: Tensors, out_features: int, in_features: int) -> RankLinear:
    """One projection of the checkpoint as its consumer computes it, in float32."""
    algo, ct = fmt.quant_algo, fmt.target == HF_COMPRESSED_TENSORS
    bias = t.get("bias")
    bias = bias.to(torch.float32) if bias is not None else None
    pre: torch.Tensor | None = None
    act: Callable[[torch.Tensor], torch.Tensor] | None = None
    if algo == "NVFP4":
        packed = t.need("weight_packed" if ct else "weight")
        block = t.need("weight_scale")
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (out_features, in_features // 2):
            raise t.fail("weight_packed" if ct else "weight", f"is {packed.dtype} {list(packed.shape)}, expected "
                         f"uint8 [{out_features}, {in_features // 2}]")
        if tuple(block.shape) != (out_features, in_features // NVFP4_BLOCK):
            raise t.fail("weight_scale", f"is {list(block.shape)}, expected [{out_features}, {in_features // 16}]")
        ws2 = 1.0 / scalar(t, "weight_global_scale") if ct else scalar(t, "weight_scale_2")
        a_scale = 1.0 / scalar(t, "input_global_scale") if ct else scalar(t, "input_scale")
        weight = unpack_e2m1(packed) * (block.to(torch.float32) * ws2).repeat_interleave(NVFP4_BLOCK, dim=1)
        act = lambda x, s=a_scale: fake_nvfp4(x, s)  # noqa: E731
    elif algo == "FP8":
        w = t.need("weight")
        if w.dtype != torch.float8_e4m3fn:
            raise t.fail("weight", f"is {w.dtype}; FP8 needs float8_e4m3fn")
        weight = w.to(torch.float32) * scalar(t, "weight_scale")
        a_scale = scalar(t, "input_scale")
        act = lambda x, s=a_scale: nx.fake_fp8(x, s)  # noqa: E731
    elif ct and fmt.bits is not None and algo in ("W8A16", "W4A16", "W4A16_AWQ"):
        words = t.need("weight_packed")
        shape = t.get("weight_shape")
        if shape is not None and tuple(int(v) for v in shape.tolist()) != (out_features, in_features):
            raise t.fail("weight_shape", f"says {shape.tolist()}, the model needs [{out_features}, {in_features}]")
        if words.shape[0] != out_features or words.shape[1] * (32 // fmt.bits) < in_features:
            raise t.fail("weight_packed", f"{list(words.shape)} cannot hold [{out_features}, {in_features}] "
                         f"{fmt.bits}-bit codes")
        weight = unpack_int32_words(words, fmt.bits, in_features) * _group_scales(t, out_features, in_features)
    elif algo == "W8A16" or algo.startswith("W8A8"):
        q = t.need("weight")
        if q.dtype != torch.int8 or tuple(q.shape) != (out_features, in_features):
            raise t.fail("weight", f"is {q.dtype} {list(q.shape)}, expected int8 [{out_features}, {in_features}]")
        s = t.need("weight_scale").to(torch.float32).reshape(-1, 1)
        if s.shape[0] != out_features:
            raise t.fail("weight_scale", f"has {s.shape[0]} values for {out_features} rows")
        weight = q.to(torch.float32) * s
        if algo == "W8A8_SQ_PER_CHANNEL":
            a_scale = scalar(t, "input_scale")
            act = lambda x, s=a_scale: nx.fake_int8(x, s)  # noqa: E731
        elif algo == "W8A8_SQ_PER_CHANNEL_PER_TOKEN":
            act = nx.fake_int8_per_token
    elif algo == "W4A16_AWQ":  # modelopt
        packed = t.need("weight")
        if tuple(packed.shape) != (out_features // 2, in_features):
            raise t.fail("weight", f"is {list(packed.shape)}, expected [{out_features // 2}, {in_features}]")
        weight = unpack_int4_rows(packed) * _group_scales(t, out_features, in_features)
        pqs = t.get("pre_quant_scale")
        if pqs is not None:
            pre = pqs.to(torch.float32).reshape(-1)
            if pre.numel() != in_features:
                raise t.fail("pre_quant_scale", f"has {pre.numel()} values for {in_features} inputs")
    else:
        raise HFCheckpointError(f"{fmt.target} {algo}: no reader for this combination")
    return RankLinear(weight, bias, pre, act)


def plain_linear(t: Tensors, out_features: int, in_features: int) -> RankLinear:
    """A projection left in the model dtype (unquantized source, KV-only, or excluded)."""
    w = t.need("weight")
    if not w.dtype.is_floating_point or w.dtype.itemsize < 2 or tuple(w.shape) != (out_features, in_features):
        raise t.fail("weight", f"is {w.dtype} {list(w.shape)}; an unquantized projection needs a 16/32-bit float "
                     f"[{out_features}, {in_features}] weight")
    bias = t.get("bias")
    return RankLinear(w.to(torch.float32), bias.to(torch.float32) if bias is not None else None)


def _group_scales(t: Tensors, out_features: int, in_features: int) -> torch.Tensor:
    s = t.need("weight_scale").to(torch.float32)
    if s.dim() == 1:
        s = s.reshape(-1, 1)
    if s.dim() != 2 or s.shape[0] != out_features or in_features % s.shape[1]:
        raise t.fail("weight_scale", f"shape {list(s.shape)} does not fit [{out_features}, {in_features}] "
                     "(expected [out, 1] or [out, in/group_size])")
    return s.repeat_interleave(in_features // s.shape[1], dim=1)
