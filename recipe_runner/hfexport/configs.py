"""config.json (with its inline `quantization_config`) and hf_quant_config.json (spec §1.2, §2.3, §3)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipe_runner.hfexport.exclusion import (COMPRESSED_TENSORS_ALWAYS_IGNORED, MODELOPT_ALWAYS_EXCLUDED,
                                              written_exclude_list)
from recipe_runner.hfexport.targets import HF_MODELOPT

HF_QUANT_CONFIG = "hf_quant_config.json"
# consumers detect the ModelOpt format by producer.name == "modelopt"; the version is the exporter
# release whose output the spec measured (the format this writer reproduces)
PRODUCER = {"name": "modelopt", "version": "0.47.0"}
MODELOPT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4", "w4a16_awq": "W4A16_AWQ", "w8a16": "W8A16"}
FP8_KV_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}


def modelopt_nested(algo: str, kv_cache: str, group_size: int, exclude: list[str]) -> dict[str, Any]:
    """hf_quant_config.json: the nested form TensorRT-LLM treats as authoritative. Algo none (the
    KV-only checkpoint) is written as ModelOpt writes it: quant_algo null, no exclusion list."""
    kv = "FP8" if kv_cache == "fp8" else None
    if algo == "none":
        return {"producer": dict(PRODUCER),
                "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv, "quantized_layers": {}}}
    q: dict[str, Any] = {"quant_algo": MODELOPT_ALGO[algo], "kv_cache_quant_algo": kv}
    if algo == "w4a16_awq":
        q.update(group_size=group_size, has_zero_point=False, pre_quant_scale=True)
    elif algo == "nvfp4":
        q["group_size"] = 16
    q["exclude_modules"] = list(exclude)
    return {"producer": dict(PRODUCER), "quantization": q}


def modelopt_flat(algo: str, kv_cache: str, exclude: list[str]) -> dict[str, Any]:
    """config.json quantization_config for hf-modelopt (vLLM reads this one first); ModelOpt's
    conversion of the nested form, which has no quant_algo key for the KV-only checkpoint."""
    c: dict[str, Any] = {"quant_method": "modelopt", "ignore": [] if algo == "none" else list(exclude),
                         "producer": dict(PRODUCER)}
    if algo != "none":
        c["quant_algo"] = MODELOPT_ALGO[algo]
    if kv_cache == "fp8":
        c["kv_cache_scheme"] = dict(FP8_KV_SCHEME)
    if algo == "fp8":
        scheme = {"dynamic": False, "num_bits": 8, "type": "float"}
        c["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": dict(scheme),
                                          "input_activations": dict(scheme)}}
    elif algo == "nvfp4":
        scheme = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        c["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": dict(scheme),
                                          "input_activations": dict(scheme)}}
    return c


def compressed_tensors(algo: str, kv_cache: str, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """config.json quantization_config for hf-compressed-tensors (vLLM's compressed-tensors loader)."""
    def scheme(num_bits, type_, strategy, group=None, dynamic=False):
        return {"num_bits": num_bits, "type": type_, "strategy": strategy, "group_size": group,
                "symmetric": True, "dynamic": dynamic}

    if algo == "nvfp4":
        fmt = "nvfp4-pack-quantized"
        weights, acts = scheme(4, "float", "tensor_group", 16), scheme(4, "float", "tensor_group", 16, "local")
    elif algo in ("w8a16", "w4a16", "w4a16_awq"):
        fmt = "pack-quantized"
        bits = 8 if algo == "w8a16" else 4
        weights = scheme(bits, "int", "group", group_size) if algo == "w4a16_awq" else scheme(bits, "int", "channel")
        acts = None
    else:  # SmoothQuant W8A8
        fmt = "int-quantized"
        weights = scheme(8, "int", "channel")
        acts = (scheme(8, "int", "tensor") if algo == "w8a8_sq_per_channel"
                else scheme(8, "int", "token", dynamic=True))
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "format": fmt}},
            "ignore": list(ignore), "kv_cache_scheme": dict(FP8_KV_SCHEME) if kv_cache == "fp8" else None}


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(source_dir: Path, out_dir: Path, settings, dtype: str, num_layers: int) -> None:
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    modelopt = settings.target == HF_MODELOPT
    exclude = written_exclude_list(settings.exclude_modules, num_layers, fused_aliases=modelopt,
                                   always=MODELOPT_ALWAYS_EXCLUDED if modelopt else COMPRESSED_TENSORS_ALWAYS_IGNORED)
    if modelopt:
        config["quantization_config"] = modelopt_flat(settings.algo, settings.kv_cache, exclude)
        nested = modelopt_nested(settings.algo, settings.kv_cache, settings.group_size, exclude)
        _dump(out_dir / HF_QUANT_CONFIG, nested)
    else:
        config["quantization_config"] = compressed_tensors(settings.algo, settings.kv_cache, settings.group_size,
                                                           exclude)
    _dump(out_dir / "config.json", config)
