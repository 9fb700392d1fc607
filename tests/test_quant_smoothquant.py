"""SmoothQuant: smoothing is function-preserving before rounding; int8 scales and both checkpoint forms."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.quant import smoothquant as sq
from tests.dequantize import dequantize_int8


def _x_and_weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, generator=gen)
    x[:, 5] *= 60.0  # an outlier channel, what SmoothQuant is for
    weights = [torch.randn(rows, 64, generator=gen) * 0.05 for rows in (64, 16, 16)]  # q, k, v
    return x, weights


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85])
def test_smoothing_leaves_the_layer_function_unchanged(alpha):
    x, weights = _x_and_weights()
    s = sq.smoothing_factors(x.abs().amax(0), weights, alpha)
    w = torch.cat(weights)  # q/k/v share one smoother
    before = x.double() @ w.double().T
    after = sq.smooth_activation(x, s).double() @ sq.smooth_weight(w, s).double().T
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-6)


def test_smoothing_factor_formula_and_migration():
    x, weights = _x_and_weights()
    a, alpha = x.abs().amax(0), 0.5
    s = sq.smoothing_factors(a, weights, alpha)
    w = torch.cat(weights).abs().amax(0)
    assert torch.allclose(s, a.pow(alpha) / w.pow(1 - alpha), rtol=1e-6)
    smoothed = sq.smooth_activation(x, s).abs().amax(0)
    assert smoothed.max() / smoothed.median() < a.max() / a.median()  # the outlier was migrated


@pytest.mark.parametrize("quantize", [sq.quantize_int8_per_channel, sq.quantize_int8_per_tensor])
def test_int8_weights_dequantize_within_half_a_step(quantize):
    _, weights = _x_and_weights()
    w = weights[0]
    q = quantize(w)
    assert q.codes.dtype == torch.int8 and int(q.codes.abs().max()) == 127
    step = q.scale if q.scale.numel() == 1 else q.scale[:, None]
    assert torch.all((dequantize_int8(q) - w).abs() <= step / 2 * (1 + 1e-6))


def test_static_scales_follow_generate_int8():
    st = sq.static_scales(x_absmax=4.0, y_absmax=2.0)
    assert st.x_orig_quant == pytest.approx(127 / 4.0) and st.y_quant_orig == pytest.approx(2.0 / 127)
    # s_y / (s_x · s_w) with s_w = 1 / weight_scale
    assert st.y_accum_quant(torch.tensor([0.01])).item() == pytest.approx((127 / 2.0) / (127 / 4.0) * 0.01)


def _quantize(model, stats, algo, out, alpha=0.5):
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    out.mkdir(exist_ok=True)
    quantize_checkpoint(model, stats, QuantSettings(algo, smoothquant_alpha=alpha), "float16", out)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def test_modelopt_form_reconstructs_each_linear(quant_model, calibration, tmp_path, hf_tensors):
    """W8A8_SQ_PER_CHANNEL: W ≈ codes·weights_scaling_factor[out]·prequant[in] within a step, and the
    engine's (x·prequant)·(codes·scale)ᵀ computes x·Wᵀ up to that rounding."""
    stats, _ = calibration
    t = _quantize(quant_model, stats, "w8a8_sq_per_channel", tmp_path)
    hf = hf_tensors(quant_model)
    p = "model.layers.2."
    for proj, module in (("self_attn.k_proj", "attention.qkv"), ("mlp.up_proj", "mlp.gate"),
                         ("mlp.down_proj", "mlp.proj")):
        w = hf[p + proj + ".weight"].float()
        codes, scale = t[p + proj + ".qweight"], t[p + proj + ".weights_scaling_factor"]
        pq = t[p + module + ".prequant_scaling_factor"]
        assert pq.dtype == torch.float16 and scale.dtype == torch.float32 and codes.dtype == torch.int8
        effective = codes.float() * scale[:, None] * pq.float()[None, :]
        assert torch.all((effective - w).abs() <= scale[:, None] / 2 * pq.float()[None, :] * (1 + 1e-5) + 1e-7)
        amax = stats.linear(2, proj).x_absmax
        act = t[p + module + ".activation_scaling_factor"]
        assert act.item() == pytest.approx((amax * pq.float()).max().item() / 127, rel=1e-6)
    assert torch.equal(t[p + "mlp.fc.prequant_scaling_factor"], t[p + "mlp.gate.prequant_scaling_factor"])


def test_plugin_form_folds_the_smoother_into_the_norm(quant_model, calibration, tmp_path, hf_tensors):
    stats, _ = calibration
    t = _quantize(quant_model, stats, "w8a8_sq_per_channel_per_token", tmp_path, alpha=0.7)
    hf = hf_tensors(quant_model)
    p = "model.layers.0."
    norm = hf[p + "input_layernorm.weight"].float()
    smoothed = t[p + "input_layernorm.smoothed"]
    assert smoothed.dtype == torch.float16
    # recover s from the weight side: codes·scale ≈ W·diag(s)
    w = hf[p + "self_attn.q_proj.weight"].float()
    a = stats.linear(0, "self_attn.q_proj").x_absmax
    colmax = torch.stack([hf[p + f"self_attn.{x}_proj.weight"].float().abs().amax(0) for x in "qkv"]).amax(0)
    s = sq.factors_from_column_max(a, colmax, 0.7)
    assert torch.allclose(smoothed.float(), norm / s, rtol=1e-3)
    codes, scale = t[p + "self_attn.q_proj.qweight"], t[p + "self_attn.q_proj.per_channel_scale"]
    assert torch.all((codes.float() * scale[:, None] - w * s).abs() <= scale[:, None] / 2 * (1 + 1e-5))
    assert t[p + "input_layernorm.scale_to_int"].item() == 1.0  # per-token: dynamic activation scales
    dense_s = t[p + "attention.dense.smoother"]
    o_a = stats.linear(0, "self_attn.o_proj").x_absmax
    o_w = hf[p + "self_attn.o_proj.weight"].float().abs().amax(0)
    assert torch.allclose(dense_s, sq.factors_from_column_max(o_a, o_w, 0.7))


def test_alpha_changes_only_the_quantize_outputs(quant_model, calibration, tmp_path):
    stats, _ = calibration
    one = _quantize(quant_model, stats, "w8a8_sq_per_tensor", tmp_path / "a", alpha=0.5)
    two = _quantize(quant_model, stats, "w8a8_sq_per_tensor", tmp_path / "b", alpha=0.9)
    name = "model.layers.1.attention.dense.smoother"
    assert not torch.equal(one[name], two[name])
    x_max = (stats.linear(1, "self_attn.o_proj").x_absmax / two[name]).max().item()
    assert two["model.layers.1.attention.dense.quantization_scaling_factor"].item() == pytest.approx(127 / x_max, rel=1e-6)
