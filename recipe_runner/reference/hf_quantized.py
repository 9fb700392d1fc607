"""The quantized Hugging Face checkpoints this project writes (hf-modelopt, hf-compressed-tensors), run
on CPU in float32 one decoder layer at a time, the way their consumers compute them.

Detection (config.json `quantization_config.quant_method`, or hf_quant_config.json beside it):

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

Projections the checkpoint lists as unquantized (hf_quant_config `exclude_modules` / config.json
`ignore`) are read as plain weights. The list is matched the way each consumer matches it, and the
readings must agree: TensorRT-LLM fnmatches its own module names, where q/k/v are one `qkv_proj`
and gate/up one `gate_up_proj`; vLLM matches each HF projection (exactly or by fnmatch for
modelopt, exactly or by `re:` regex for compressed-tensors) and needs the members of a fused group
to agree.

The weight layouts are read here independently of the exporter (hfexport/export.py): a packing or
scale mistake there shows up in the logits instead of being undone by shared code. Only the
activation rounding reuses quant/nvfp4.py's E2M1 arithmetic. Facts from hf-quantized-checkpoint.md
§1.3, §1.4, §3, copied.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable

import torch

from recipe_runner.errors import StageFailed, UserError
from recipe_runner.hf.config import ModelConfig, read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.reference import numerics as nx
from recipe_runner.reference.checkpoint import read_json_object
from recipe_runner.reference.linear import RankLinear
from recipe_runner.reference.model import rms_norm
from recipe_runner.reference.rope import Rope, apply_rope

HF_MODELOPT = "hf-modelopt"
HF_COMPRESSED_TENSORS = "hf-compressed-tensors"
HF_QUANT_CONFIG = "hf_quant_config.json"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
NVFP4_BLOCK = 16
MODELOPT_ALGOS = ("FP8", "W8A16", "W4A16_AWQ", "NVFP4")
# the module TensorRT-LLM's PyTorch backend builds for each HF projection (fused names, spec §2.1)
TRTLLM_MODULE = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
                 "self_attn.v_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj",
                 "mlp.up_proj": "mlp.gate_up_proj", "self_attn.o_proj": "self_attn.o_proj",
                 "mlp.down_proj": "mlp.down_proj"}


class HFCheckpointError(StageFailed):
    """The quantized HF checkpoint's tensors do not have the layout its format needs (exit 1)."""


@dataclass(frozen=True)
class HFQuantFormat:
    target: str  # hf-modelopt / hf-compressed-tensors
    # FP8, W8A16, W4A16, W4A16_AWQ, NVFP4, W8A8_SQ_PER_CHANNEL[_PER_TOKEN]; None: KV-only
    quant_algo: str | None
    kv_cache_quant_algo: str | None  # FP8 or None
    bits: int | None = None  # pack-quantized
    group_size: int | None = None
    exclude: tuple[str, ...] = ()  # exclude_modules / ignore, as written

    def _vllm_excludes(self, module: str) -> bool:
        if self.target == HF_COMPRESSED_TENSORS:
            return any(module == p or (p.startswith("re:") and re.match(p[3:], module)) for p in self.exclude)
        return any(module == p or fnmatchcase(module, p) for p in self.exclude)

    def quantized_projections(self, layer: int) -> dict[str, bool]:
        """HF projection -> whether its weights are quantized, as both consumers read the exclusion list;
        raises HFCheckpointError where they would disagree or a fused group is split."""
        if self.quant_algo is None:
            return {p: False for p in PROJECTIONS}
        pre = f"model.layers.{layer}."
        vllm = {p: not self._vllm_excludes(pre + p) for p in PROJECTIONS}
        result = {}
        for p in PROJECTIONS:
            fused = [q for q in PROJECTIONS if TRTLLM_MODULE[q] == TRTLLM_MODULE[p]]
            if len({vllm[q] for q in fused}) > 1:
                raise HFCheckpointError(f"the exclusion list splits {pre}{TRTLLM_MODULE[p]}: "
                                        f"{', '.join(q for q in fused if not vllm[q])} excluded, the rest not; "
                                        "the consumers fuse these projections and need them alike")
            result[p] = vllm[p]
            if self.target == HF_MODELOPT:
                trtllm = not any(fnmatchcase(pre + TRTLLM_MODULE[p], x) for x in self.exclude)
                if trtllm != vllm[p]:
                    raise HFCheckpointError(
                        f"exclude_modules {'lists' if not vllm[p] else 'does not list'} {pre}{p} but "
                        f"{'does not match' if trtllm else 'matches'} {pre}{TRTLLM_MODULE[p]}, the module "
                        "TensorRT-LLM's PyTorch backend builds: it and vLLM would quantize different layers")
        return result




def is_hf_checkpoint(directory: Path) -> bool:
    """A Hugging Face model directory (config.json with model_type/architectures), not a TensorRT-LLM one."""
    path = directory / "config.json"
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "architecture" not in raw and ("architectures" in raw or "model_type" in raw)


def detect_format(directory: Path) -> HFQuantFormat | None:
    """The quantization format of a HF checkpoint directory (None: not quantized)."""
    config = read_json_object(directory / "config.json")
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if (directory / HF_QUANT_CONFIG).is_file():
        nested = read_json_object(directory / HF_QUANT_CONFIG).get("quantization") or {}
        algo, kv = nested.get("quant_algo"), nested.get("kv_cache_quant_algo")
        if algo not in (*MODELOPT_ALGOS, None):
            raise UserError(f"{directory / HF_QUANT_CONFIG}: quant_algo {algo!r} is not supported by verify "
                            f"(supported: {', '.join(MODELOPT_ALGOS)}, or null with an FP8 KV cache)")
        if kv not in (None, "FP8"):
            raise UserError(f"{directory / HF_QUANT_CONFIG}: kv_cache_quant_algo {kv!r} is not supported (FP8)")
        return HFQuantFormat(HF_MODELOPT, algo, kv, group_size=nested.get("group_size"),
                             exclude=tuple(nested.get("exclude_modules") or ()))
    if method == "modelopt":
        algo = qc.get("quant_algo")
        if algo not in (*MODELOPT_ALGOS, None):
            raise UserError(f"{directory / 'config.json'}: modelopt quant_algo {algo!r} is not supported by verify")
        return HFQuantFormat(HF_MODELOPT, algo, "FP8" if qc.get("kv_cache_scheme") else None,
                             exclude=tuple(qc.get("ignore") or ()))
    if method == "compressed-tensors":
        return _compressed_tensors_format(directory, qc)
    if method is not None:
        raise UserError(f"{directory / 'config.json'}: quant_method {method!r} is not supported by verify "
                        "(supported: modelopt, compressed-tensors)")
    return None


def _compressed_tensors_format(directory: Path, qc: dict) -> HFQuantFormat:
    where = directory / "config.json"
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise UserError(f"{where}: compressed-tensors with {len(groups)} config groups is not supported by verify "
                        "(one group targeting Linear)")
    group = next(iter(groups.values()))
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    fmt = qc.get("format") or group.get("format")
    kv = "FP8" if qc.get("kv_cache_scheme") else None
    ignore = tuple(qc.get("ignore") or ())
    if fmt == "nvfp4-pack-quantized":
        return HFQuantFormat(HF_COMPRESSED_TENSORS, "NVFP4", kv, 4, NVFP4_BLOCK, ignore)
    if fmt == "pack-quantized":
        bits = int(weights.get("num_bits", 0))
        if bits not in (4, 8) or acts:
            raise UserError(f"{where}: pack-quantized with {bits}-bit weights and activations {acts} is not supported "
                            "(int4/int8 weight-only)")
        grouped = weights.get("strategy") == "group"
        algo = "W8A16" if bits == 8 else "W4A16_AWQ" if grouped else "W4A16"
        return HFQuantFormat(HF_COMPRESSED_TENSORS, algo, kv, bits, weights.get("group_size") if grouped else None,
                             ignore)
    if fmt == "int-quantized":
        if not acts or int(weights.get("num_bits", 0)) != 8:
            raise UserError(f"{where}: int-quantized without int8 W8A8 schemes is not supported by verify")
        dynamic = acts.get("dynamic") or acts.get("strategy") == "token"
        algo = "W8A8_SQ_PER_CHANNEL_PER_TOKEN" if dynamic else "W8A8_SQ_PER_CHANNEL"
        return HFQuantFormat(HF_COMPRESSED_TENSORS, algo, kv, 8, exclude=ignore)
    raise UserError(f"{where}: compressed-tensors format {fmt!r} is not supported by verify (supported: "
                    "pack-quantized, int-quantized, nvfp4-pack-quantized)")


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
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1).long()
    mag = E2M1[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


def fake_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation quantization: per 16 inputs an E4M3 block scale over the fp32 global scale."""
    from recipe_runner.quant import nvfp4

    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    scales = nvfp4.block_scales(flat, global_scale)
    return nvfp4.dequantize(nvfp4.quantize(flat, scales, global_scale), scales, global_scale).reshape(shape)


class _Tensors:
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


def _scalar(t: _Tensors, suffix: str) -> torch.Tensor:
    value = t.need(suffix).to(torch.float32)
    if value.numel() != 1:
        raise t.fail(suffix, f"has shape {list(value.shape)}; expected one value")
    return value.reshape(())


def quantized_linear(fmt: HFQuantFormat, t: _Tensors, out_features: int, in_features: int) -> RankLinear:
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
        ws2 = 1.0 / _scalar(t, "weight_global_scale") if ct else _scalar(t, "weight_scale_2")
        a_scale = 1.0 / _scalar(t, "input_global_scale") if ct else _scalar(t, "input_scale")
        weight = unpack_e2m1(packed) * (block.to(torch.float32) * ws2).repeat_interleave(NVFP4_BLOCK, dim=1)
        act = lambda x, s=a_scale: fake_nvfp4(x, s)  # noqa: E731
    elif algo == "FP8":
        w = t.need("weight")
        if w.dtype != torch.float8_e4m3fn:
            raise t.fail("weight", f"is {w.dtype}; FP8 needs float8_e4m3fn")
        weight = w.to(torch.float32) * _scalar(t, "weight_scale")
        a_scale = _scalar(t, "input_scale")
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
            a_scale = _scalar(t, "input_scale")
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


def plain_linear(t: _Tensors, out_features: int, in_features: int) -> RankLinear:
    """A projection left in the model dtype (unquantized source, KV-only, or excluded)."""
    w = t.need("weight")
    if not w.dtype.is_floating_point or w.dtype.itemsize < 2 or tuple(w.shape) != (out_features, in_features):
        raise t.fail("weight", f"is {w.dtype} {list(w.shape)}; an unquantized projection needs a 16/32-bit float "
                     f"[{out_features}, {in_features}] weight")
    bias = t.get("bias")
    return RankLinear(w.to(torch.float32), bias.to(torch.float32) if bias is not None else None)


def _group_scales(t: _Tensors, out_features: int, in_features: int) -> torch.Tensor:
    s = t.need("weight_scale").to(torch.float32)
    if s.dim() == 1:
        s = s.reshape(-1, 1)
    if s.dim() != 2 or s.shape[0] != out_features or in_features % s.shape[1]:
        raise t.fail("weight_scale", f"shape {list(s.shape)} does not fit [{out_features}, {in_features}] "
                     "(expected [out, 1] or [out, in/group_size])")
    return s.repeat_interleave(in_features // s.shape[1], dim=1)


# ---- the model ------------------------------------------------------------------------------------

@dataclass
class HFLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    linears: dict[str, RankLinear]
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


class HFQuantizedModel:
    """Logits of a quantized HF LLaMA / Mistral checkpoint, computed layer by layer on CPU."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.model_config: ModelConfig = read_model_config(self.dir)
        self.format = detect_format(self.dir)
        self.reader = SourceCheckpoint(self.dir)
        c = self.model_config
        if c.hidden_act not in ("silu", "swiglu"):
            raise UserError(f"hidden_act '{c.hidden_act}' is not supported (LLaMA uses silu)")
        self.rope = Rope(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.rope.check()

    @property
    def dtype(self) -> str:
        return str(self.model_config.torch_dtype or "")

    def facts(self) -> dict[str, object]:
        f = self.format
        return {"architecture": self.model_config.architecture, "dtype": self.dtype,
                "format": f.target if f else "hf", "quant_algo": f.quant_algo if f else None,
                "kv_cache_quant_algo": f.kv_cache_quant_algo if f else None, "tp_size": 1, "pp_size": 1}

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.reader:
            raise HFCheckpointError(f"{self.dir}: tensor '{name}' is missing")
        return self.reader.read(name).to(torch.float32)

    def layer(self, index: int) -> HFLayer:
        """Decoder layer `index` as its consumer computes it (weights dequantized to float32)."""
        c, fmt = self.model_config, self.format
        pre = f"model.layers.{index}."
        d = c.head_dim
        dims = {"self_attn.q_proj": (c.num_attention_heads * d, c.hidden_size),
                "self_attn.k_proj": (c.num_key_value_heads * d, c.hidden_size),
                "self_attn.v_proj": (c.num_key_value_heads * d, c.hidden_size),
                "self_attn.o_proj": (c.hidden_size, c.num_attention_heads * d),
                "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
                "mlp.up_proj": (c.intermediate_size, c.hidden_size),
                "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
        linears = {}
        quantized = fmt.quantized_projections(index) if fmt else dict.fromkeys(dims, False)
        for proj, (o, i) in dims.items():
            t = _Tensors(self.reader, f"{pre}{proj}.", fmt or HFQuantFormat("hf", None, None))
            linears[proj] = quantized_linear(fmt, t, o, i) if quantized[proj] else plain_linear(t, o, i)
        k_scale = v_scale = None
        if fmt is not None and fmt.kv_cache_quant_algo == "FP8":
            k_scale = _scalar(_Tensors(self.reader, f"{pre}self_attn.k_proj.", fmt), "k_scale")
            v_scale = _scalar(_Tensors(self.reader, f"{pre}self_attn.v_proj.", fmt), "v_scale")
        return HFLayer(self._read(pre + "input_layernorm.weight"), self._read(pre + "post_attention_layernorm.weight"),
                       linears, k_scale, v_scale)

    def _attention(self, layer: HFLayer, x: torch.Tensor) -> torch.Tensor:
        c = self.model_config
        T, d = x.shape[0], c.head_dim
        q, k, v = (layer.linears[p](x).reshape(T, -1, d).transpose(0, 1)
                   for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        cos, sin = self.rope.tables(T)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer.k_scale is not None:  # the cache holds K after rope, V as projected
            k, v = nx.fake_fp8(k, layer.k_scale), nx.fake_fp8(v, layer.v_scale)
        groups = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        return layer.linears["self_attn.o_proj"]((probs @ v).transpose(0, 1).reshape(T, -1))

    def _decoder(self, layer: HFLayer, x: torch.Tensor) -> torch.Tensor:
        eps = self.model_config.rms_norm_eps
        x = x + self._attention(layer, rms_norm(x, layer.input_norm, eps))
        h = rms_norm(x, layer.post_norm, eps)
        mlp = layer.linears
        return x + mlp["mlp.down_proj"](torch.nn.functional.silu(mlp["mlp.gate_proj"](h)) * mlp["mlp.up_proj"](h))

    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """[len(seq), vocab_size] float32 logits for each token sequence."""
        c = self.model_config
        with torch.no_grad():
            table = self._read("model.embed_tokens.weight")
            hidden = [table[torch.tensor(seq)] for seq in sequences]
            del table
            for index in range(c.num_hidden_layers):
                layer = self.layer(index)
                hidden = [self._decoder(layer, h) for h in hidden]
                del layer
                self.reader.release()
            norm = self._read("model.norm.weight")
            head_name = "lm_head.weight"
            if head_name not in self.reader and c.tie_word_embeddings:
                head_name = "model.embed_tokens.weight"
            head = self._read(head_name)
            return [(rms_norm(h, norm, c.rms_norm_eps) @ head.T)[:, :c.vocab_size] for h in hidden]
