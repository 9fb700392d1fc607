"""FP8 E4M3 per-tensor scales (amax/448) and KV-cache scales from calibration."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.quant import fp8, kv
from tests.conftest import calibration_texts
from tests.dequantize import dequantize_fp8


def test_fp8_scale_is_amax_over_448_and_rounding_is_within_half_an_e4m3_step():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, 0] = 3.0
    scale = fp8.fp8_scale(w.abs().max())
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    assert scale.item() == pytest.approx(3.0 / 448)
    codes = fp8.quantize_fp8(w, scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.float().abs().max().item() == 448.0
    error = (dequantize_fp8(codes, scale) - w).abs()
    # 3 mantissa bits: half a step is |x|/16 for normals; 2^-10 (in scaled units) for subnormals
    bound = torch.maximum(w.abs() / 16, torch.full_like(w, 2.0 ** -10) * scale)
    assert torch.all(error <= bound * (1 + 1e-6))


def test_kv_scales_follow_the_formulas():
    assert kv.kv_cache_scale("int8", 2.0, 1.0, 0.5).item() == pytest.approx(2.0 / 127)  # q's range counts
    assert kv.kv_cache_scale("fp8", 2.0, 1.0, 0.5).item() == pytest.approx(1.0 / 448)  # k and v only
    with pytest.raises(ValueError):
        kv.kv_cache_scale("int4", 1.0, 1.0, 1.0)


def _direct_projection_amax(model_dir) -> dict[tuple[int, str], float]:
    """max |output| of every q/k/v projection from a plain whole-model forward over the same
    calibration tokens (the fixture's settings: 12 samples, seed 0, 24 tokens)."""
    import transformers

    from recipe_runner.calibration.dataset import sample_texts
    from recipe_runner.calibration.tokens import load_tokenizer, tokenize

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    amax: dict[tuple[int, str], float] = {}

    def hook(key):
        def record(module, inputs, output):
            amax[key] = max(amax.get(key, 0.0), float(output.abs().max()))
        return record

    for i, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, proj).register_forward_hook(hook((i, proj)))
    tokenizer = load_tokenizer(model_dir)
    with torch.no_grad():
        for ids in tokenize(tokenizer, sample_texts(calibration_texts(), 12, 0), 24):  # one sample at a time
            model(torch.tensor([ids]))
    return amax


@pytest.mark.parametrize("kind, qmax, projections", [("int8", 127, ("q_proj", "k_proj", "v_proj")),
                                                      ("fp8", 448, ("k_proj", "v_proj"))])
def test_kv_cache_scales_equal_a_direct_forward(quant_model, calibration, tmp_path, kind, qmax, projections):
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = calibration
    quantize_checkpoint(quant_model, stats, QuantSettings("none", kind), "float16", tmp_path)
    direct = _direct_projection_amax(quant_model)
    for layer in range(4):
        stored = load_file(tmp_path / f"layer{layer:05d}.kv.safetensors")
        got = stored[f"model.layers.{layer}.attention.kv_cache_scaling_factor"]
        want = max(direct[(layer, p)] for p in projections) / qmax
        assert got.dtype == torch.float32 and got.shape == (1,)
        assert got.item() == pytest.approx(want, rel=1e-5)


def test_fp8_checkpoint_scales(quant_model, calibration, tmp_path, hf_tensors):
    """weights_scaling_factor = amax/448 over the fused qkv (and shared by fc/gate);
    activation_scaling_factor = calibration input amax / 448; weights dequantize within a step."""
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = calibration
    quantize_checkpoint(quant_model, stats, QuantSettings("fp8"), "float16", tmp_path)
    hf = {k: v.float() for k, v in hf_tensors(quant_model).items()}
    layer = 1
    scales = load_file(tmp_path / f"layer{layer:05d}.scales.safetensors")
    p = f"model.layers.{layer}."
    groups = {"attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "mlp.fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate": ["mlp.gate_proj", "mlp.up_proj"],
              "attention.dense": ["self_attn.o_proj"], "mlp.proj": ["mlp.down_proj"]}
    for lin, projs in groups.items():
        amax = max(hf[p + q + ".weight"].abs().max().item() for q in projs)
        assert scales[p + lin + ".weights_scaling_factor"].item() == pytest.approx(amax / 448, rel=1e-6)
        x_amax = stats.linear(layer, projs[0]).x_absmax.max().item()
        assert scales[p + lin + ".activation_scaling_factor"].item() == pytest.approx(x_amax / 448, rel=1e-6)
    codes = load_file(tmp_path / f"layer{layer:05d}.self_attn.k_proj.safetensors")[p + "self_attn.k_proj.qweight"]
    scale = scales[p + "attention.qkv.weights_scaling_factor"]
    w = hf[p + "self_attn.k_proj.weight"]
    error = (codes.float() * scale - w).abs()
    assert torch.all(error <= torch.maximum(w.abs() / 16, 2.0 ** -10 * scale) * (1 + 1e-5))
