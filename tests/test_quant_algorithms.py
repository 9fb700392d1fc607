"""The algorithm table (quant/algorithms.py): the schema offers exactly its algos, and every fact the
formats write is what it was before the table existed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe_runner.quant.algorithms import ALGORITHMS, KV_CACHES, statistics_families

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = (ROOT / "recipe_runner" / "data" / "recipe.v1.schema.json", ROOT / "schema" / "recipe.v1.schema.json")

# recipe algo -> (TensorRT-LLM quant_algo, ModelOpt quant_algo, compressed-tensors format)
NAMES = {
    "none": (None, None, None),
    "w8a16": ("W8A16", "W8A16", "pack-quantized"),
    "w4a16": ("W4A16", None, "pack-quantized"),
    "w4a16_awq": ("W4A16_AWQ", "W4A16_AWQ", "pack-quantized"),
    "w8a8_sq_per_channel": ("W8A8_SQ_PER_CHANNEL", None, "int-quantized"),
    "w8a8_sq_per_channel_per_token": ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", None, "int-quantized"),
    "w8a8_sq_per_tensor": ("W8A8_SQ_PER_TENSOR_PLUGIN", None, None),
    "fp8": ("FP8", "FP8", None),
    "nvfp4": (None, "NVFP4", "nvfp4-pack-quantized"),
}
TP, VLLM = "TensorRT-LLM's PyTorch backend", "vLLM"
LOADERS = {  # (target, algo) -> consumers, as hfexport/targets.py listed them
    ("hf-modelopt", "fp8"): (TP, VLLM), ("hf-modelopt", "nvfp4"): (TP, VLLM), ("hf-modelopt", "w4a16_awq"): (TP,),
    ("hf-modelopt", "w8a16"): (TP,), ("hf-modelopt", "none"): (TP,),
    ("hf-compressed-tensors", "w8a16"): (VLLM,), ("hf-compressed-tensors", "w4a16"): (VLLM,),
    ("hf-compressed-tensors", "w4a16_awq"): (VLLM,), ("hf-compressed-tensors", "nvfp4"): (VLLM, TP),
    ("hf-compressed-tensors", "w8a8_sq_per_channel"): (VLLM,),
    ("hf-compressed-tensors", "w8a8_sq_per_channel_per_token"): (VLLM,),
}


def _schema_enum(path: Path, field: str) -> list:
    return json.loads(path.read_text())["properties"]["quantization"]["properties"][field]["enum"]


def test_the_schema_offers_exactly_the_table():
    assert SCHEMAS[0].read_bytes() == SCHEMAS[1].read_bytes()
    for path in SCHEMAS:
        assert _schema_enum(path, "algo") == list(ALGORITHMS)
        assert _schema_enum(path, "kv_cache") == list(KV_CACHES)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_written_names_are_unchanged(algo):
    a = ALGORITHMS[algo]
    trtllm, modelopt, ct = NAMES[algo]
    assert a.name == algo and a.source
    assert a.trtllm_quant_algo == trtllm and a.modelopt_algo == modelopt
    assert (a.compressed_tensors.format if a.compressed_tensors else None) == ct
    assert a.trtllm_checkpoint == (algo != "nvfp4")
    assert a.sq_plugin == (algo in ("w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor"))
    for target in ("hf-modelopt", "hf-compressed-tensors"):
        assert a.hf_loaders.get(target, ()) == LOADERS.get((target, algo), ())
        # a target is either loaded (and has its tensor set) or refused with a reason
        assert (target in a.hf_loaders) != (target in a.hf_refusals)
        assert (target in a.hf_tensors) == (target in a.hf_loaders and a.quantizes_weights)


def test_kv_cache_names_and_calibration_families():
    assert {k: (v.trtllm_kv_algo, v.hf_kv_algo) for k, v in KV_CACHES.items()} == {
        "none": (None, None), "int8": ("INT8", None), "fp8": ("FP8", "FP8")}
    assert {a: statistics_families(a, "int8") for a in ALGORITHMS} == {
        "none": ["kv"], "w8a16": ["kv"], "w4a16": ["kv"], "w4a16_awq": ["awq", "kv"],
        "w8a8_sq_per_channel": ["smoothquant", "kv"], "w8a8_sq_per_channel_per_token": ["smoothquant", "kv"],
        "w8a8_sq_per_tensor": ["smoothquant", "kv"], "fp8": ["amax", "kv"], "nvfp4": ["amax", "kv"]}
    # the fields an HF export's key holds besides algo, kv_cache and exclude_modules
    assert {a: v.params for a, v in ALGORITHMS.items() if v.params} == {
        "w4a16_awq": ("group_size",), "w8a8_sq_per_channel": ("smoothquant_alpha",),
        "w8a8_sq_per_channel_per_token": ("smoothquant_alpha",), "w8a8_sq_per_tensor": ("smoothquant_alpha",)}
    assert [a for a, v in ALGORITHMS.items() if v.kv_caches != tuple(KV_CACHES)] == ["fp8"]


def test_quantization_section_per_algo():
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.trtllm.quant import quantization_section

    awq = quantization_section(QuantSettings("w4a16_awq", "int8", 64, exclude_modules=("lm_head",)))
    assert (awq["quant_algo"], awq["kv_cache_quant_algo"], awq["group_size"]) == ("W4A16_AWQ", "INT8", 64)
    assert awq["pre_quant_scale"] is True and awq["has_zero_point"] is False
    assert quantization_section(QuantSettings("w8a8_sq_per_tensor", smoothquant_alpha=0.8))["smoothquant_val"] == 0.8
    none = quantization_section(QuantSettings("none", "fp8"))
    assert none["quant_algo"] is None and none["kv_cache_quant_algo"] == "FP8" and none["exclude_modules"] is None


def test_settings_from_any_stage_params():
    from recipe_runner.quant.settings import QuantSettings

    full = {"algo": "w4a16_awq", "kv_cache": "fp8", "group_size": 64, "smoothquant_alpha": 0.7,
            "exclude_modules": ["lm_head", "*mlp.proj"]}
    assert QuantSettings.from_params(full) == QuantSettings("w4a16_awq", "fp8", 64, 0.7, ("lm_head", "*mlp.proj"))
    # an export stage's params hold only the knobs its algo reads: the rest keep their defaults
    assert QuantSettings.from_params({"algo": "fp8", "kv_cache": "none", "exclude_modules": ["lm_head"]}) == \
        QuantSettings("fp8")


def _suffixes(rules) -> set[str]:
    return {r.suffix.rsplit(".", 1)[-1] for r in rules}


@pytest.mark.parametrize("algo", [a for a, v in ALGORITHMS.items() if v.trtllm_checkpoint and v.quantizes_weights])
def test_rank_file_tensors_are_the_tables(quant_model, calibration, tmp_path, algo):
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = calibration
    artifact = quantize_checkpoint(quant_model, stats, QuantSettings(algo, group_size=64), "float16", tmp_path)
    for rules in artifact.layers.values():
        assert _suffixes(rules) == set(ALGORITHMS[algo].trtllm_tensors)


@pytest.mark.parametrize("target, algo", [(t, a) for a, v in ALGORITHMS.items() for t in v.hf_tensors])
def test_hf_tensors_are_the_tables(hf_exported, target, algo):
    from safetensors import safe_open

    out = hf_exported(target, algo, "none")
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    rows = dict(ALGORITHMS[algo].hf_tensors[target])
    for proj, follows_norm in (("self_attn.o_proj", False), ("mlp.up_proj", True)):
        pre = f"model.layers.0.{proj}."
        written = {n[len(pre):] for n in names if n.startswith(pre)}
        # the prequant row only where no norm absorbs 1/s; the input scale only for static activations
        expected = {s for s, src in rows.items() if not (src == "prequant" and follows_norm)
                    and not (src.startswith("input_scale") and ALGORITHMS[algo].activations != "static")}
        assert written == expected
