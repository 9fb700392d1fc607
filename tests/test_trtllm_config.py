"""config.json construction and dtype resolution."""
from __future__ import annotations

import json

import pytest

from recipe_runner.errors import UserError
from recipe_runner.hf.config import ModelConfig
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.config import (
    build_checkpoint_config,
    config_json_bytes,
    quant_config,
    resolve_dtype,
)

LLAMA31_8B = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192,
                                       "rope_type": "llama3"},
    torch_dtype="bfloat16")

# docs/format/trtllm-checkpoint.md §2.6 (Llama-3.1-8B, fp16, tp=2, pp=1)
SPEC_EXAMPLE = {
    "architecture": "LlamaForCausalLM", "dtype": "float16", "logits_dtype": "float32",
    "vocab_size": 128256, "max_position_embeddings": 131072, "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_size": 128, "hidden_act": "silu", "intermediate_size": 14336, "norm_epsilon": 1e-05,
    "position_embedding_type": "rope_gpt_neox", "rotary_base": 500000.0,
    "rotary_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "use_parallel_embedding": False, "embedding_sharding_dim": 0,
    "share_embedding_table": False, "qk_layernorm": False, "mlp_bias": False,
    "attn_bias": False, "residual_mlp": False,
    "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1},
    "quantization": {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128,
                     "smoothquant_val": 0.5, "clamp_val": None, "use_meta_recipe": False,
                     "has_zero_point": False, "pre_quant_scale": False,
                     "exclude_modules": None},
}


def test_matches_spec_example():
    cfg = build_checkpoint_config(LLAMA31_8B, dtype="float16", mapping=ParallelMapping(2, 1))
    assert {k: cfg[k] for k in SPEC_EXAMPLE} == SPEC_EXAMPLE
    # the remaining keys are LLaMAConfig fields at their neutral values
    assert {k: cfg[k] for k in set(cfg) - set(SPEC_EXAMPLE)} == {
        "tie_word_embeddings": False, "disable_weight_only_quant_plugin": False,
        "remove_duplicated_kv_heads": False, "fc_after_embed": False,
        "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True,
        "layer_idx_offset": 0, "embedding_multiplier": 1.0, "attention_multiplier": 1.0,
        "residual_multiplier": 1.0, "output_multiplier_scale": 1.0}


def test_rotary_scaling_is_a_copy():
    cfg = build_checkpoint_config(LLAMA31_8B, dtype="bfloat16", mapping=ParallelMapping(1, 1))
    cfg["rotary_scaling"]["factor"] = 1.0
    assert LLAMA31_8B.rope_scaling["factor"] == 8.0


def test_quantization_section_can_be_filled_by_later_stages():
    q = quant_config(quant_algo="W8A16", exclude_modules=["*lm_head"])
    cfg = build_checkpoint_config(LLAMA31_8B, dtype="float16", mapping=ParallelMapping(1, 1),
                                  quantization=q)
    assert cfg["quantization"]["quant_algo"] == "W8A16"
    assert cfg["quantization"]["group_size"] == 128
    with pytest.raises(ValueError, match=r"\['sq_use_plugin'\]"):
        quant_config(sq_use_plugin=True)


def test_resolve_dtype():
    assert resolve_dtype("auto", "bfloat16") == "bfloat16"
    # TensorRT-LLM's infer_dtype: float32 and a missing torch_dtype become float16
    assert resolve_dtype("auto", None) == "float16"
    assert resolve_dtype("auto", "float32") == "float16"
    assert resolve_dtype("float32", "float32") == "float32"
    assert resolve_dtype("float16", "bfloat16") == "float16"
    with pytest.raises(UserError, match=r"dtype 'auto' cannot use the model's torch_dtype "
                                        r"'float64'; set dtype to one of float16, bfloat16, "
                                        r"float32"):
        resolve_dtype("auto", "float64")


def test_serialization_is_deterministic_json():
    cfg = build_checkpoint_config(LLAMA31_8B, dtype="float16", mapping=ParallelMapping(2, 2))
    raw = config_json_bytes(cfg)
    assert raw == config_json_bytes(json.loads(raw))
    assert raw.endswith(b"}\n") and json.loads(raw)["mapping"]["world_size"] == 4
