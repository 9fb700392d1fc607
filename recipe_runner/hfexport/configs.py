"""config.json (with its inline `quantization_config`) and hf_quant_config.json.

The formats: docs/format/hf-quantized-checkpoint.md §1.2, §2.3, §3.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipe_runner.hfexport.exclusion import (COMPRESSED_TENSORS_ALWAYS_IGNORED, MODELOPT_ALWAYS_EXCLUDED,
                                              written_exclude_list)
from recipe_runner.hfexport.targets import HF_MODELOPT
from recipe_runner.quant.algorithms import AWQ, KV_CACHES, CtArgs
from recipe_runner.quant.settings import QuantSettings

HF_QUANT_CONFIG = "hf_quant_config.json"
# consumers detect the ModelOpt format by producer.name == "modelopt"; the version is the exporter
# release whose output docs/format/hf-quantized-checkpoint.md §1 measured (the format this writer
# reproduces)
PRODUCER = {"name": "modelopt", "version": "0.47.0"}
FP8_KV_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}


def modelopt_nested(settings: QuantSettings, exclude: list[str]) -> dict[str, Any]:
    """hf_quant_config.json: the nested form TensorRT-LLM treats as authoritative. Algo none (the
    KV-only checkpoint) is written as ModelOpt writes it: quant_algo null, no exclusion list."""
    algorithm = settings.algorithm
    kv = KV_CACHES[settings.kv_cache].hf_kv_algo
    if not algorithm.quantizes_weights:
        return {"producer": dict(PRODUCER),
                "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv, "quantized_layers": {}}}
    q: dict[str, Any] = {"quant_algo": algorithm.modelopt_algo, "kv_cache_quant_algo": kv}
    if algorithm.family == AWQ:
        q.update(group_size=settings.group_size, has_zero_point=False, pre_quant_scale=True)
    elif algorithm.block_size:
        q["group_size"] = algorithm.block_size
    q["exclude_modules"] = list(exclude)
    return {"producer": dict(PRODUCER), "quantization": q}


def modelopt_flat(settings: QuantSettings, exclude: list[str]) -> dict[str, Any]:
    """config.json quantization_config for hf-modelopt (vLLM reads this one first); ModelOpt's
    conversion of the nested form, which has no quant_algo key for the KV-only checkpoint."""
    algorithm = settings.algorithm
    c: dict[str, Any] = {"quant_method": "modelopt", "ignore": list(exclude) if algorithm.quantizes_weights else [],
                         "producer": dict(PRODUCER)}
    if algorithm.quantizes_weights:
        c["quant_algo"] = algorithm.modelopt_algo
    if KV_CACHES[settings.kv_cache].hf_kv_algo:
        c["kv_cache_scheme"] = dict(FP8_KV_SCHEME)
    if algorithm.weight_type == "float":  # FP8 / NVFP4: the weights' and activations' float format
        scheme: dict[str, Any] = {"dynamic": False, "num_bits": algorithm.weight_bits, "type": "float"}
        if algorithm.block_size:
            scheme["group_size"] = algorithm.block_size
        c["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": dict(scheme),
                                          "input_activations": dict(scheme)}}
    return c


def _ct_args(args: CtArgs | None, group_size: int) -> dict[str, Any] | None:
    if args is None:
        return None
    group = group_size if args.strategy == "group" and args.group_size is None else args.group_size
    return {"num_bits": args.num_bits, "type": args.type, "strategy": args.strategy, "group_size": group,
            "symmetric": True, "dynamic": args.dynamic}


def compressed_tensors(settings: QuantSettings, ignore: list[str]) -> dict[str, Any]:
    """config.json quantization_config for hf-compressed-tensors (vLLM's compressed-tensors loader)."""
    scheme = settings.algorithm.compressed_tensors
    if scheme is None:
        raise ValueError(f"algo {settings.algo} has no compressed-tensors form")
    fmt = scheme.format
    group = {"targets": ["Linear"], "weights": _ct_args(scheme.weights, settings.group_size),
             "input_activations": _ct_args(scheme.input_activations, settings.group_size), "format": fmt}
    kv = dict(FP8_KV_SCHEME) if KV_CACHES[settings.kv_cache].hf_kv_algo else None
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": list(ignore), "kv_cache_scheme": kv}


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_configs(source_dir: Path, out_dir: Path, settings: QuantSettings, target: str, dtype: str,
                  num_layers: int) -> None:
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    modelopt = target == HF_MODELOPT
    exclude = written_exclude_list(settings.exclude_modules, num_layers, fused_aliases=modelopt,
                                   always=MODELOPT_ALWAYS_EXCLUDED if modelopt else COMPRESSED_TENSORS_ALWAYS_IGNORED)
    if modelopt:
        config["quantization_config"] = modelopt_flat(settings, exclude)
        _dump(out_dir / HF_QUANT_CONFIG, modelopt_nested(settings, exclude))
    else:
        config["quantization_config"] = compressed_tensors(settings, exclude)
    _dump(out_dir / "config.json", config)
