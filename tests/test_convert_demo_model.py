"""make_tiny_llama: the fixture factory itself."""
from __future__ import annotations

import json

import pytest
import torch

from recipe_runner.demo import make_tiny_llama


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("kwargs", [{}, {"weights_format": "bin"}, {"max_shard_size": "100KB"}])
def test_same_seed_same_bytes(tmp_path, kwargs):
    a = make_tiny_llama(tmp_path / "a", seed=3, **kwargs)
    b = make_tiny_llama(tmp_path / "b", seed=3, **kwargs)
    assert files(a) == files(b)
    c = make_tiny_llama(tmp_path / "c", seed=4, **kwargs)
    assert files(a) != files(c)


def test_config_and_weights(tiny_model, hf_tensors):
    model = tiny_model("gqa")
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["vocab_size"], cfg["num_key_value_heads"]) == (1001, 2)
    t = hf_tensors(model)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)
    norm = t["model.layers.0.input_layernorm.weight"]
    assert norm.dtype == torch.float16 and not torch.all(norm == 1)  # not HF's all-ones init


def test_bin_records_dtype(tiny_model):
    cfg = json.loads((tiny_model("bin") / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"


def test_rope_scaling_argument_not_mutated(tmp_path):
    scaling = {"rope_type": "linear", "factor": 2.0}
    make_tiny_llama(tmp_path / "m", rope_scaling=scaling)
    assert scaling == {"rope_type": "linear", "factor": 2.0}
