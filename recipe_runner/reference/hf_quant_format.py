"""Which quantized Hugging Face checkpoint a directory holds (hf-modelopt, hf-compressed-tensors), and
which of its projections are quantized; the reference reader is recipe_runner.reference.hf_quantized.

Detection (config.json `quantization_config.quant_method`, or hf_quant_config.json beside it) gives
an `HFQuantFormat`; the formats and their tensors are tabled in reference/hf_quant_linear.py.

Projections the checkpoint lists as unquantized (hf_quant_config `exclude_modules` / config.json
`ignore`) are read as plain weights. The list is matched the way each consumer matches it, and the
readings must agree: TensorRT-LLM fnmatches its own module names, where q/k/v are one `qkv_proj`
and gate/up one `gate_up_proj`; vLLM matches each HF projection (exactly or by fnmatch for
modelopt, exactly or by `re:` regex for compressed-tensors) and needs the members of a fused group
to agree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from recipe_runner.errors import StageFailed, UserError
from recipe_runner.reference.checkpoint import read_json_object

HF_MODELOPT = "hf-modelopt"
HF_COMPRESSED_TENSORS = "hf-compressed-tensors"
HF_QUANT_CONFIG = "hf_quant_config.json"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NVFP4_BLOCK = 16
MODELOPT_ALGOS = ("FP8", "W8A16", "W4A16_AWQ", "NVFP4")
# the module TensorRT-LLM's PyTorch backend builds for each HF projection (fused names,
# docs/format/hf-quantized-checkpoint.md §2.1)
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
