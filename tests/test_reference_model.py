"""The reference forward of unquantized checkpoints equals the Hugging Face model's logits, for
every mapping and model shape the converter writes; the layer-by-layer HF runner equals the
whole-model forward."""
from __future__ import annotations

import pytest
import torch

from recipe_runner.api import convert
from recipe_runner.reference import HFLayerwiseModel, ReferenceModel

SEQUENCES = [[1, 5, 9, 200, 17, 3, 999, 45, 12, 7, 8, 1000], [4], [300, 2, 77]]
FP16_ROUNDING = 2e-3  # logits here are below 2 in magnitude; fp32 compute differs by ~1e-6


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("variant", ["gqa", "mistral"])
def test_layerwise_hf_equals_the_whole_model_forward(tiny_model, variant):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(variant)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = [full(torch.tensor([s])).logits[0] for s in SEQUENCES]
    assert max_error(HFLayerwiseModel(model_dir).logits(SEQUENCES), want) < 1e-5


CASES = [  # (variant, convert kwargs)
    ("gqa", dict(tp_size=1, pp_size=1)),
    ("gqa", dict(tp_size=2, pp_size=2)),
    ("gqa", dict(tp_size=4, pp_size=1)),  # 2 KV heads duplicated over 4 ranks
    ("gqa", dict(tp_size=8, pp_size=1)),  # one q head per rank
    ("gqa", dict(tp_size=1, pp_size=3)),  # 4 layers over 3 stages: 2, 1, 1
    ("gqa", dict(tp_size=2, use_parallel_embedding=True)),  # vocab 1001: padded row split
    ("gqa", dict(tp_size=2, use_parallel_embedding=True, embedding_sharding_dim=1)),
    ("mha", dict(tp_size=4, pp_size=2)),
    ("tied", dict(tp_size=2)),
    ("bias", dict(tp_size=2)),
    ("mqa_headdim", dict(tp_size=4)),
    ("mistral", dict(tp_size=2, dtype="float16")),  # bf16 source -> fp16 checkpoint
    ("gqa", dict(dtype="bfloat16")),  # fp16 -> bf16 loses 3 mantissa bits
]


@pytest.mark.parametrize("variant, kwargs", CASES, ids=[f"{v}-{'-'.join(f'{k}{x}' for k, x in kw.items())}"
                                                        for v, kw in CASES])
def test_reference_matches_hf_to_fp16_rounding(tiny_model, tmp_path, variant, kwargs):
    model_dir = tiny_model(variant)
    ckpt = convert(model_dir, tmp_path / "ckpt", **kwargs)
    error = max_error(ReferenceModel(ckpt).logits(SEQUENCES), HFLayerwiseModel(model_dir).logits(SEQUENCES))
    lossy = kwargs.get("dtype") == "bfloat16"
    assert error < (0.05 if lossy else FP16_ROUNDING)
    if variant == "gqa" and "dtype" not in kwargs:
        assert error < 1e-5  # same weights, same math: only float32 summation order differs


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
], ids=lambda s: s["rope_type"])
def test_rope_scaling_from_the_checkpoint_config(tiny_model, tmp_path, scaling):
    # max_position_embeddings 16 < 24 tokens, so dynamic NTK rescales too
    model_dir = tiny_model("gqa", rope_scaling=scaling, max_position_embeddings=16, rope_theta=500.0,
                           num_hidden_layers=2)
    ckpt = convert(model_dir, tmp_path / "ckpt", tp_size=2)
    sequences = [list(range(3, 27)), [5, 6, 7]]
    error = max_error(ReferenceModel(ckpt).logits(sequences), HFLayerwiseModel(model_dir).logits(sequences))
    assert error < 1e-5
