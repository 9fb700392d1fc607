"""HF config.json dialects -> ModelConfig."""
from __future__ import annotations

import json

import pytest

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.config import ModelConfig, read_model_config

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "hidden_act": "silu", "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "model_type": "llama",
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "hidden_act": "silu", "mlp_bias": False, "attention_bias": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


def write(tmp_path, cfg) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return read_model_config(tmp_path)


def test_llama2_defaults(tmp_path):
    m = write(tmp_path, LLAMA2_7B)
    assert m == ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, torch_dtype="float16")


def test_llama31_llama3_rope_scaling_copied(tmp_path):
    m = write(tmp_path, LLAMA31_8B)
    assert m.rope_theta == 500000.0
    assert m.rope_scaling == LLAMA31_8B["rope_scaling"]
    assert (m.num_key_value_heads, m.head_dim, m.torch_dtype) == (8, 128, "bfloat16")


def test_llama32_tied_and_explicit_head_dim(tmp_path):
    cfg = {**LLAMA31_8B, "hidden_size": 3072, "num_attention_heads": 24, "head_dim": 128,
           "tie_word_embeddings": True}
    m = write(tmp_path, cfg)
    assert (m.head_dim, m.tie_word_embeddings) == (128, True)


def test_head_dim_not_hidden_over_heads(tmp_path):
    m = write(tmp_path, {**LLAMA31_8B, "hidden_size": 5120, "head_dim": 128})  # Mistral-Nemo
    assert m.head_dim == 128


def test_codellama_linear_and_dynamic(tmp_path):
    m = write(tmp_path, {**LLAMA2_7B, "rope_theta": 1000000, "rope_scaling":
                         {"type": "linear", "factor": 4.0}})
    assert (m.rope_theta, m.rope_scaling) == (1000000.0, {"type": "linear", "factor": 4.0})
    m = write(tmp_path, {**LLAMA2_7B, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert m.rope_scaling == {"type": "dynamic", "factor": 2.0}


def test_yarn(tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert write(tmp_path, {**LLAMA2_7B, "rope_scaling": scaling}).rope_scaling == scaling


def test_transformers5_rope_parameters(tmp_path):
    cfg = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling",
                                                            "torch_dtype")}
    cfg["dtype"] = "bfloat16"
    cfg["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    m = write(tmp_path, cfg)
    assert m.rope_theta == 500000.0
    assert m.rope_scaling == LLAMA31_8B["rope_scaling"]  # rope_theta is not a scaling field
    assert m.torch_dtype == "bfloat16"


def test_default_rope_type_means_no_scaling(tmp_path):
    cfg = {**LLAMA2_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}
    m = write(tmp_path, cfg)
    assert (m.rope_theta, m.rope_scaling) == (20000.0, None)
    m = write(tmp_path, {**LLAMA2_7B, "rope_scaling": {"rope_type": "default"}})
    assert m.rope_scaling is None


def test_mistral_sliding_window(tmp_path):
    m = write(tmp_path, {**LLAMA31_8B, "architectures": ["MistralForCausalLM"],
                         "sliding_window": 4096})
    assert (m.architecture, m.sliding_window) == ("MistralForCausalLM", 4096)


def test_num_key_value_heads_defaults_to_heads(tmp_path):
    cfg = {k: v for k, v in LLAMA2_7B.items() if k != "num_key_value_heads"}
    assert write(tmp_path, cfg).num_key_value_heads == 32


def test_tiny_model_from_demo(tiny_model):
    m = read_model_config(tiny_model("gqa"))
    assert (m.vocab_size, m.hidden_size, m.num_attention_heads, m.num_key_value_heads,
            m.head_dim, m.torch_dtype, m.rope_scaling) == (1001, 64, 8, 2, 8, "float16", None)


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"]},
     "unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM, "
     "MistralForCausalLM"),
    ({"architectures": None},
     "missing 'architectures' (e.g. [\"LlamaForCausalLM\"]); supported: LlamaForCausalLM, "
     "MistralForCausalLM"),
    ({"hidden_size": None}, "missing required key 'hidden_size'"),
    ({"vocab_size": "big"}, "'vocab_size' must be a positive integer, got 'big'"),
    ({"num_key_value_heads": 5}, "num_attention_heads=32 is not a multiple of "
                                 "num_key_value_heads=5"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
     "unsupported rope scaling type 'longrope'; supported: linear, dynamic, llama3, yarn"),
    ({"rope_scaling": {"type": "linear"}},
     "rope scaling 'linear' needs a finite 'factor' greater than 0, got None"),
])
def test_bad_configs(tmp_path, change, message):
    with pytest.raises(SourceModelError) as e:
        write(tmp_path, {**LLAMA2_7B, **change})
    assert str(e.value) == f"{tmp_path / 'config.json'}: {message}"


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 4096,\n  oops}')
    with pytest.raises(SourceModelError, match=r"config.json: invalid JSON at line 2 column 3"):
        read_model_config(tmp_path)
