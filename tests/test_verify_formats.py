"""Every checkpoint format verify simulates passes its default tolerances on a tiny model, and the
simulation really quantizes (the figures are above float32 noise).

Quantized checkpoints are built from unquantized ones with the formulas of
docs/format/trtllm-checkpoint.md §4 (tests/quantized_checkpoints.py), independently of the quantize
stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipe_runner.api import convert
from recipe_runner.reference.checkpoint import CheckpointError
from recipe_runner.reference.linear import rank_linear
from recipe_runner.verify.run import verify_checkpoint
from recipe_runner.verify.tolerances import DEFAULTS, default_tolerances
from tests.quantized_checkpoints import quantize_checkpoint, with_quant_algo

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Explain tensor parallelism in one sentence:"]
FORMATS = {  # name -> (builder algo or config quant_algo, kv)
    "w8a16": ("W8A16", None),
    "w4a16": ("W4A16", None),
    "w8a16_int8": ("w8a16_int8", None),
    "w4a16_awq": ("awq", None),
    "fp8": ("fp8", None),
    "sq_modelopt": ("sq_modelopt", None),
    "sq_plugin_per_token": ("sq_per_token", None),
    "sq_plugin_per_tensor": ("sq_per_tensor", None),
    "kv_int8": (None, "INT8"),
    "kv_fp8": (None, "FP8"),
    "fp8_kv_fp8": ("fp8", "FP8"),
    "sq_per_token_kv_int8": ("sq_per_token", "INT8"),
}


def build(model_dir, tmp_path, name: str, tp: int):
    algo, kv = FORMATS[name]
    ckpt = convert(model_dir, tmp_path / "plain", tp_size=tp)
    if algo in ("W8A16", "W4A16"):  # float weights: trtllm-build quantizes them
        return with_quant_algo(ckpt, tmp_path / name, algo)
    return quantize_checkpoint(ckpt, tmp_path / name, model_dir, algo, kv=kv)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_within_its_default_tolerance(tiny_model, tmp_path, name, tp):
    model_dir = tiny_model("gqa", with_tokenizer=True)
    ckpt = build(model_dir, tmp_path, name, tp)
    quant = json.loads((ckpt / "config.json").read_text())["quantization"]
    result = verify_checkpoint(ckpt, model_dir, prompts=PROMPTS)
    assert result.passed, [f.message for f in result.failures]
    assert result.tolerances == default_tolerances(quant["quant_algo"], quant["kv_cache_quant_algo"])
    assert set(result.tolerance_sources.values()) == {result.tolerance_sources["mean_kl"]}
    assert result.figures.mean_abs_logit_error > 1e-3  # quantization was simulated, not skipped
    assert result.figures.tokens == 37


def test_unquantized_checkpoint_is_exact(tiny_model, tmp_path):
    model_dir = tiny_model("gqa", with_tokenizer=True)
    result = verify_checkpoint(convert(model_dir, tmp_path / "ckpt", tp_size=2, pp_size=2), model_dir,
                               prompts=PROMPTS, token_ids=[[1, 2, 3]])
    assert result.passed and result.tolerances == DEFAULTS["none"]
    assert result.figures.max_abs_logit_error < 1e-5 and result.figures.top1_agreement == 1.0
    assert result.figures.perplexity_source == pytest.approx(result.figures.perplexity_checkpoint)
    assert [i.label for i in result.inputs] == ["prompt 1", "prompt 2", "prompt 3", "token_ids 1"]


def test_excluded_modules_stay_unquantized(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")
    plain = convert(model_dir, tmp_path / "plain")
    ckpt = with_quant_algo(plain, tmp_path / "w8", "W8A16")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization"]["exclude_modules"] = ["*.attention.*", "*.mlp.*"]
    (ckpt / "config.json").write_text(json.dumps(config))
    result = verify_checkpoint(ckpt, model_dir, token_ids=[[1, 2, 3, 4]])
    assert result.figures.max_abs_logit_error < 1e-5


def test_gpu_preprocessed_weight_only_layout_is_refused_clearly():
    from recipe_runner.reference.checkpoint import parse_config

    cfg = parse_config({"architecture": "LlamaForCausalLM", "dtype": "float16", "vocab_size": 8, "hidden_size": 4,
                        "num_hidden_layers": 1, "num_attention_heads": 1,
                        "quantization": {"quant_algo": "W8A16"}}, Path("config.json"))
    tensors = {"mlp.fc.weight": torch.zeros(4, 4, dtype=torch.int8), "mlp.fc.per_channel_scale": torch.ones(4)}
    with pytest.raises(CheckpointError, match="GPU-preprocessed weight-only layout"):
        rank_linear(cfg, tensors, "mlp.fc", where="rank0.safetensors", prefix="transformer.layers.0.")
