"""One tensor-parallel rank's piece of a linear layer, built from that rank's checkpoint tensors the
way trtllm-build would build it for the checkpoint's `quant_algo` (docs/format/trtllm-checkpoint.md
§4, docs/format/verified-layouts.md), as a float32 effective weight plus the input transforms the
engine applies.

| quant_algo                  | stored per linear (besides weight/bias)                  | simulated here |
|-----------------------------|----------------------------------------------------------|----------------|
| none                        | —                                                        | plain GEMM |
| W8A16 / W4A16 (float weight)| — (trtllm-build quantizes at build time)                 | per-channel int8/int4 rounding |
| W8A16 (int8 weight)         | weights_scaling_factor [out]                             | q·s |
| W4A16_AWQ                   | int8 [out/2,in] packed int4, weights_scaling_factor [out,in/g], prequant_scaling_factor [in] | (x·pq)·(q·s)ᵀ |
| W8A8_SQ_PER_CHANNEL         | weights_scaling_factor [out], activation_scaling_factor [1], prequant_scaling_factor [in] | int8 fake-quant of x·pq |
| W8A8_SQ_*_PLUGIN            | per_channel_scale, act_scale, smoother, norm scale_to_int, quantization_scaling_factor | int8 GEMM with the plugin's scales |
| FP8                         | float8 weight, weights_scaling_factor [1], activation_scaling_factor [1] | fp8 fake-quant of x |
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from recipe_runner.errors import UserError
from recipe_runner.reference import numerics as nx
from recipe_runner.reference.checkpoint import CheckpointConfig, CheckpointError

WEIGHT_ONLY_BITS = {"W8A16": 8, "W4A16": 4}
SQ_PLUGIN_ALGOS = frozenset({
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN",
})
SUPPORTED_ALGOS = frozenset({None, *WEIGHT_ONLY_BITS, "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL", "FP8", *SQ_PLUGIN_ALGOS})
SUPPORTED_KV_ALGOS = frozenset({None, "INT8", "FP8"})
# Where the SmoothQuant plugin quantizes each linear's input when activations are static:
# qkv/fc/gate read the int8 output of the preceding RmsNorm, dense/proj quantize in the module.
SQ_INPUT_QUANT_SCALE = {
    "attention.qkv": "input_layernorm.scale_to_int",
    "attention.dense": "attention.quantization_scaling_factor",
    "mlp.fc": "post_layernorm.scale_to_int",
    "mlp.gate": "post_layernorm.scale_to_int",
    "mlp.proj": "mlp.quantization_scaling_factor",
}

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RankLinear:
    """y = quant(x · input_scale) @ weightᵀ + bias, all in float32."""

    weight: torch.Tensor  # [out_local, in_local], what the GEMM effectively multiplies by
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None  # per input channel (pre-quant scale, 1/smoother)
    input_quant: Transform | None = None  # activation fake-quantization

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def check_algos(cfg: CheckpointConfig) -> None:
    if cfg.quant_algo not in SUPPORTED_ALGOS:
        raise UserError(f"quant_algo {cfg.quant_algo} is not supported by the reference forward (supported: "
                        + ", ".join(sorted(a for a in SUPPORTED_ALGOS if a)) + ")")
    if cfg.kv_cache_quant_algo not in SUPPORTED_KV_ALGOS:
        raise UserError(f"kv_cache_quant_algo {cfg.kv_cache_quant_algo} is not supported (INT8, FP8)")


def is_excluded(cfg: CheckpointConfig, module_name: str) -> bool:
    """exclude_modules are fnmatch patterns; trtllm-build matches module and tensor names."""
    names = (module_name, module_name + ".weight")
    return any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude_modules for n in names)


class _Tensors:
    """A rank's layer tensors with error messages that name the rank file and tensor."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str, prefix: str):
        self.tensors, self.where, self.prefix = tensors, where, prefix

    def get(self, suffix: str) -> torch.Tensor | None:
        return self.tensors.get(suffix)

    def need(self, suffix: str, algo: str | None) -> torch.Tensor:
        if suffix not in self.tensors:
            raise CheckpointError(f"{self.where}: {self.prefix}{suffix} is missing; quant_algo {algo} needs it")
        return self.tensors[suffix]

    def fail(self, suffix: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {self.prefix}{suffix}: {why}")


def rank_linear(cfg: CheckpointConfig, tensors: Mapping[str, torch.Tensor], module: str, *,
                where: str, prefix: str, with_bias: bool = True) -> RankLinear:
    """The rank's `module` (e.g. "attention.qkv") as trtllm-build would run it.

    `with_bias=False` drops the bias (row-parallel layers add it once, after the all-reduce).
    """
    t = _Tensors(tensors, where, prefix)
    weight = t.need(f"{module}.weight", cfg.quant_algo)
    bias = t.get(f"{module}.bias") if with_bias else None
    bias = bias.to(torch.float32) if bias is not None else None
    algo = cfg.quant_algo
    if algo is None or is_excluded(cfg, prefix + module):
        if not weight.is_floating_point() or weight.dtype == torch.float8_e4m3fn:
            raise t.fail(f"{module}.weight", f"is {weight.dtype} but the module is not quantized "
                         f"(quant_algo {algo}{', excluded' if algo else ''}); trtllm-build expects {cfg.dtype}")
        return RankLinear(weight.to(torch.float32), bias)
    if algo in WEIGHT_ONLY_BITS:
        return _weight_only(t, module, weight, bias, WEIGHT_ONLY_BITS[algo])
    if algo == "FP8":
        return _fp8(t, module, weight, bias)
    if weight.dtype != torch.int8:
        raise t.fail(f"{module}.weight", f"is {weight.dtype}; quant_algo {algo} needs int8")
    if algo == "W4A16_AWQ":
        return _awq(cfg, t, module, weight, bias)
    if algo == "W8A8_SQ_PER_CHANNEL":
        return _sq_modelopt(t, module, weight, bias)
    return _sq_plugin(cfg, t, module, weight, bias)


def _weight_only(t: _Tensors, module: str, weight: torch.Tensor, bias, bits: int) -> RankLinear:
    if weight.is_floating_point():  # the recommended form: trtllm-build quantizes at build time
        return RankLinear(nx.simulate_weight_only(weight, bits), bias)
    scale = t.get(f"{module}.weights_scaling_factor")
    if weight.dtype == torch.int8 and bits == 8 and scale is not None:  # ModelOpt export [out, in]
        if scale.numel() != weight.shape[0]:
            raise t.fail(f"{module}.weights_scaling_factor", f"has {scale.numel()} values for {weight.shape[0]} rows")
        return RankLinear(weight.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1), bias)
    raise t.fail(f"{module}.weight", f"{weight.dtype} {list(weight.shape)} is TensorRT-LLM's GPU-preprocessed "
                 "weight-only layout, which cannot be read back on CPU; write the weights in the model dtype")


def _fp8(t: _Tensors, module: str, weight: torch.Tensor, bias) -> RankLinear:
    if weight.dtype == torch.int8:  # trtllm-build views int8 bytes as float8_e4m3fn
        weight = weight.view(torch.float8_e4m3fn)
    if weight.dtype != torch.float8_e4m3fn:
        raise t.fail(f"{module}.weight", f"is {weight.dtype}; quant_algo FP8 needs float8_e4m3fn")
    w_scale = t.need(f"{module}.weights_scaling_factor", "FP8").to(torch.float32).reshape(-1)
    a_scale = t.need(f"{module}.activation_scaling_factor", "FP8").to(torch.float32).reshape(-1)
    if w_scale.numel() != 1 or a_scale.numel() != 1:
        raise t.fail(module, "FP8 scales must be per-tensor ([1])")
    a = a_scale.reshape(())  # 0-dim: usable with hidden states on any device (--device)
    return RankLinear(weight.to(torch.float32) * w_scale, bias, None, lambda x: nx.fake_fp8(x, a))


def _awq(cfg: CheckpointConfig, t: _Tensors, module: str, weight: torch.Tensor, bias) -> RankLinear:
    q = nx.unpack_int4_rows(weight)  # [out, in]
    scale = t.need(f"{module}.weights_scaling_factor", "W4A16_AWQ").to(torch.float32)
    out_features, in_features = q.shape
    if scale.dim() != 2 or scale.shape[0] != out_features or in_features % scale.shape[1]:
        raise t.fail(f"{module}.weights_scaling_factor",
                     f"shape {list(scale.shape)} does not fit the unpacked weight [{out_features}, {in_features}] "
                     "(expected [out, in/group_size])")
    group = in_features // scale.shape[1]
    if group != cfg.group_size:
        raise t.fail(f"{module}.weights_scaling_factor",
                     f"implies group size {group} but config.json says group_size {cfg.group_size}")
    pre = t.get(f"{module}.prequant_scaling_factor")
    pre = pre.to(torch.float32).reshape(-1) if pre is not None else None
    if pre is not None and pre.numel() != in_features:
        raise t.fail(f"{module}.prequant_scaling_factor", f"has {pre.numel()} values for {in_features} inputs")
    return RankLinear(q * scale.repeat_interleave(group, dim=1), bias, pre)


def _sq_modelopt(t: _Tensors, module: str, weight: torch.Tensor, bias) -> RankLinear:
    algo = "W8A8_SQ_PER_CHANNEL"
    w_scale = t.need(f"{module}.weights_scaling_factor", algo).to(torch.float32).reshape(-1, 1)
    a_scale = t.need(f"{module}.activation_scaling_factor", algo).to(torch.float32).reshape(-1)
    pre = t.need(f"{module}.prequant_scaling_factor", algo).to(torch.float32).reshape(-1)
    if w_scale.shape[0] != weight.shape[0] or pre.numel() != weight.shape[1] or a_scale.numel() != 1:
        raise t.fail(module, f"scale shapes {list(w_scale.shape)}, {list(a_scale.shape)}, {list(pre.shape)} do not fit "
                     f"weight {list(weight.shape)} (expected [out], [1], [in])")
    a = a_scale.reshape(())  # 0-dim: usable with hidden states on any device (--device)
    return RankLinear(weight.to(torch.float32) * w_scale, bias, pre, lambda x: nx.fake_int8(x, a))


def _sq_plugin(cfg: CheckpointConfig, t: _Tensors, module: str, weight: torch.Tensor, bias) -> RankLinear:
    algo = cfg.quant_algo
    per_channel = t.need(f"{module}.per_channel_scale", algo).to(torch.float32).reshape(-1)
    if per_channel.numel() not in (1, weight.shape[0]):
        raise t.fail(f"{module}.per_channel_scale", f"has {per_channel.numel()} values for {weight.shape[0]} rows")
    smoother = t.get(f"{module}.smoother")
    input_scale = 1.0 / smoother.to(torch.float32).reshape(-1) if smoother is not None else None
    if algo.endswith("PER_TOKEN_PLUGIN"):  # out = acc · token_scale · per_channel_scale
        return RankLinear(weight.to(torch.float32) * per_channel.reshape(-1, 1), bias, input_scale,
                          nx.fake_int8_per_token)
    # static activations: out = acc · act_scale · per_channel_scale, x quantized by a quant scale
    act_scale = t.need(f"{module}.act_scale", algo).to(torch.float32).reshape(())
    quant_scale = t.need(SQ_INPUT_QUANT_SCALE[module], algo).to(torch.float32).reshape(())
    effective = weight.to(torch.float32) * (per_channel * act_scale).reshape(-1, 1)
    return RankLinear(effective, bias, input_scale, lambda x: nx.int8_from_quant_scale(x, quant_scale))
