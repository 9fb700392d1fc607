"""The reference forward's building blocks: quantization arithmetic and rotary tables."""
from __future__ import annotations

import pytest
import torch

from recipe_runner.reference import numerics as nx
from recipe_runner.reference.rope import Rope


def test_int4_rows_unpack_low_nibble_first_and_signed():
    # row 2k in the low nibble, row 2k+1 in the high nibble (docs/format/verified-layouts.md)
    packed = torch.tensor([[0x7F, 0x08], [-1, 0x21]], dtype=torch.uint8).view(torch.int8)
    assert nx.unpack_int4_rows(packed).tolist() == [[-1, -8], [7, 0], [-1, 1], [-1, 2]]


def test_weight_only_simulation_matches_trtllm_symmetric_quantize():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [-2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float16)
    int8 = nx.simulate_weight_only(w, 8)
    # scale = amax/128: the largest magnitude rounds to 128 and is clamped to 127 when positive
    assert int8[0, 0].item() == pytest.approx(127 / 128)
    assert int8[1, 0].item() == -2.0  # -128 · (2/128) is representable
    assert torch.equal(int8[2], torch.zeros(4))  # an all-zero row stays zero (no 0/0)
    int4 = nx.simulate_weight_only(w, 4)
    assert int4[0].tolist() == pytest.approx([7 / 8, -0.5, 0.25, 0.0])
    assert int4[1, 0].item() == -2.0
    # round half away from zero (std::round), not half to even: 2.5 -> 3
    half = nx.simulate_weight_only(torch.tensor([[8.0, 2.5]]), 4)
    assert half[0, 1].item() == 3.0


def test_activation_fake_quantization():
    x = torch.tensor([0.3, -1.0, 500.0, 2.5])
    assert nx.fake_int8(x, 1.0).tolist() == [0.0, -1.0, 127.0, 2.0]  # half to even, saturating
    assert nx.fake_fp8(x, 1.0).tolist() == [pytest.approx(0.3125), -1.0, 448.0, 2.5]
    per_token = nx.fake_int8_per_token(torch.tensor([[127.0, 0.4], [1.27, -0.6]]))
    assert per_token.tolist() == [[127.0, 0.0], [pytest.approx(1.27), pytest.approx(-0.6)]]


def _hf_tables(rope_parameters: dict, seq_len: int, max_pos: int = 16):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_parameters={"rope_theta": 500.0, **rope_parameters})
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(seq_len).unsqueeze(0))
    return cos[0], sin[0]


@pytest.mark.parametrize("scaling", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "beta_fast": 8, "beta_slow": 2,
     "attention_factor": 1.5},
])
@pytest.mark.parametrize("seq_len", [12, 40])  # 40 > max_position_embeddings: dynamic NTK kicks in
def test_rope_tables_match_transformers(scaling, seq_len):
    rope = Rope(16, 500.0, scaling, max_position_embeddings=16)
    rope.check()
    cos, sin = rope.tables(seq_len)
    want_cos, want_sin = _hf_tables(scaling, seq_len)
    torch.testing.assert_close(cos, want_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, want_sin, rtol=1e-5, atol=1e-5)


def test_unsupported_rope_scaling_is_refused():
    from recipe_runner.errors import UserError

    with pytest.raises(UserError, match="rotary_scaling type 'longrope' is not supported"):
        Rope(16, 1e4, {"type": "longrope", "factor": 2.0}, 16).check()
