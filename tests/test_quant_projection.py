"""The per-projection quantizer (quant/projection.py): its values, its declared shapes, and the same
values in the TensorRT-LLM rank-file layout and the Hugging Face layouts."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.calibration.stats import AwqResult, CalibrationStats, LinearStats
from recipe_runner.models.llama import LLAMA
from recipe_runner.hfexport.export import FORMS
from recipe_runner.quant import smoothquant as sq
from recipe_runner.quant.algorithms import ALGORITHMS
from recipe_runner.quant.projection import NO_SCALING, ProjectionQuantizer
from recipe_runner.quant.settings import QuantSettings

INPUT_GROUPS = tuple(g.projections for g in LLAMA.groups)
from recipe_runner.stages.quantize import TRTLLM, TRTLLM_SQ_PLUGIN

F16 = torch.float16
ALL_FORMS = {"trtllm": TRTLLM, "trtllm-sq-plugin": TRTLLM_SQ_PLUGIN, **FORMS}
O_PROJ, UP_PROJ = "self_attn.o_proj", "mlp.up_proj"


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(48, 32, generator=g).to(F16).float() for group in INPUT_GROUPS for p in group}


def _stats(weights: dict[str, torch.Tensor]) -> CalibrationStats:
    g = torch.Generator().manual_seed(1)
    stats = CalibrationStats()
    for group in INPUT_GROUPS:
        x = torch.rand(32, generator=g) * 4 + 0.1
        for p in group:
            stats.linears[(0, p)] = LinearStats(x.clone(), torch.rand(48, generator=g) + 0.5)
        stats.awq[(0, group[0])] = AwqResult(0.5, torch.rand(32, generator=g) + 0.5, [])
    return stats


def _quantize(algo: str, form, projection: str, weights, stats, norm: torch.Tensor | None = None):
    quantizer = ProjectionQuantizer(QuantSettings(algo, group_size=16), form, F16)
    group = next(g for g in INPUT_GROUPS if projection in g)
    scaling = quantizer.scale_group(stats, 0, group, lambda p: weights[p].clone(),
                                    (lambda: norm) if norm is not None else None)
    return quantizer, scaling, quantizer.quantize(weights[projection].clone(), scaling)


def test_weight_only_values_are_the_same_in_both_layouts():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]])
    settings = QuantSettings("w8a16")
    trt = ProjectionQuantizer(settings, TRTLLM, F16).quantize(w.clone(), NO_SCALING)
    hf = ProjectionQuantizer(settings, FORMS["hf-modelopt"], F16).quantize(w.clone(), NO_SCALING)
    tiny = torch.finfo(torch.float32).tiny
    assert torch.equal(trt.weight_scale, torch.tensor([2.0 / 127, tiny])) and torch.equal(hf.weight_scale, trt.weight_scale)
    assert trt.codes is None  # trtllm-build quantizes W8A16 itself
    assert hf.codes.tolist() == [[64, -127, 32, 16], [0, 0, 0, 0]]
    # compressed-tensors rounds the scales to the model dtype first, and the codes come from those
    ct = ProjectionQuantizer(QuantSettings("w4a16"), FORMS["hf-compressed-tensors"], F16).quantize(w.clone(), NO_SCALING)
    assert ct.weight_scale.dtype == F16 and ct.weight_scale[0] == torch.tensor(2.0 / 7).to(F16)
    assert ct.codes[0].tolist() == torch.round(w[0] / ct.weight_scale[0].float()).clamp(-8, 7).tolist()


def test_fp8_is_the_same_in_both_layouts_and_fused_scales_share_the_group_amax():
    weights = _weights()
    stats = _stats(weights)
    _, scaling, trt = _quantize("fp8", TRTLLM, O_PROJ, weights, stats)
    _, _, hf = _quantize("fp8", FORMS["hf-modelopt"], O_PROJ, weights, stats)
    amax = float(weights[O_PROJ].abs().max())
    assert trt.weight_scale.shape == () and float(trt.weight_scale) == pytest.approx(amax / 448, rel=1e-7)
    assert torch.equal(trt.weight_scale, hf.weight_scale) and torch.equal(trt.codes.view(torch.uint8),
                                                                          hf.codes.view(torch.uint8))
    x_amax = float(stats.linear(0, O_PROJ).x_absmax.max())
    assert float(trt.input_scale) == pytest.approx(x_amax / 448, rel=1e-7) and torch.equal(trt.input_scale,
                                                                                         hf.input_scale)
    # q/k/v: trtllm-build fuses them into one GEMM, so the rank files share one weight scale
    _, _, q = _quantize("fp8", TRTLLM, "self_attn.q_proj", weights, stats)
    qkv_amax = max(float(weights[p].abs().max()) for p in INPUT_GROUPS[0])
    assert float(q.weight_scale) == pytest.approx(qkv_amax / 448, rel=1e-7)


@pytest.mark.parametrize("algo", ["fp8", "nvfp4", "w8a16", "w8a8_sq_per_channel", "w4a16_awq"])
def test_fp8_and_nvfp4_take_the_model_dtype_weight_with_the_same_bytes(algo):
    """Unsmoothed FP8 and NVFP4 are given the mapped model-dtype weight (no float32 copy of it): codes and
    scales equal those of the float32 copy; every other family keeps the float32 copy it smooths or rounds."""
    weights, stats = _weights(), _stats(_weights())
    for name, form in (("trtllm", TRTLLM), ("hf-modelopt", FORMS["hf-modelopt"])):
        quantizer, scaling, from_float = _quantize(algo, form, UP_PROJ, weights, stats)
        takes = quantizer.takes_model_dtype(scaling)
        assert takes == (algo in ("fp8", "nvfp4")), name
        if takes:
            half = weights[UP_PROJ].to(F16)
            before = half.clone()
            from_half = quantizer.quantize(half, scaling)
            assert torch.equal(half, before), name  # not written to: it may be a read-only map of the source
            for field in ("codes", "weight_scale", "weight_scale_2", "input_scale"):
                a, b = getattr(from_float, field), getattr(from_half, field)
                assert (a is None and b is None) or torch.equal(a.reshape(-1).view(torch.uint8),
                                                                  b.reshape(-1).view(torch.uint8)), (name, field)


def test_awq_prequant_is_the_same_in_both_layouts():
    weights = _weights()
    stats = _stats(weights)
    _, _, trt = _quantize("w4a16_awq", TRTLLM, O_PROJ, weights, stats)
    _, _, hf = _quantize("w4a16_awq", FORMS["hf-modelopt"], O_PROJ, weights, stats)
    p = (1.0 / stats.awq_scales(0, O_PROJ)).to(F16)
    assert torch.equal(trt.prequant, p) and torch.equal(hf.prequant, p)
    assert trt.weight_scale.shape == (48, 2) and torch.allclose(trt.weight_scale, hf.weight_scale, rtol=1e-6)
    # the codes dequantize to the smoothed weight W/p within half a step
    smoothed = weights[O_PROJ] / p.float()
    deq = trt.codes.float().reshape(48, 2, 16) * trt.weight_scale[:, :, None]
    assert torch.all((deq.reshape(48, 32) - smoothed).abs() <= trt.weight_scale.repeat_interleave(16, 1) / 2 * 1.001)


def test_smoothing_is_folded_into_the_norm_exactly():
    weights = _weights()
    stats = _stats(weights)
    norm = (torch.rand(32, generator=torch.Generator().manual_seed(2)) + 0.5).to(F16).float()
    _, scaling, hf = _quantize("w8a8_sq_per_channel", FORMS["hf-compressed-tensors"], UP_PROJ, weights, stats, norm)
    s = sq.smoothing_factors(stats.linear(0, "mlp.gate_proj").x_absmax,
                             [weights["mlp.gate_proj"], weights[UP_PROJ]], 0.5)
    folded = scaling.smoothing.norm
    assert folded.dtype == F16 and torch.equal(folded, (norm * (1.0 / s).to(F16).float()).to(F16))
    assert hf.prequant is None  # the norm absorbs 1/s
    # W is divided by what the rounded norm really applies: (W / ratio) · ratio ≈ W
    ratio = folded.float() / norm
    deq = hf.codes.float() * hf.weight_scale[:, None] * ratio[None, :]
    assert torch.allclose(deq, weights[UP_PROJ], atol=float(hf.weight_scale.max() * ratio.max()))
    # the plugin form keeps s in float32 and divides the norm by it
    _, plugin, _ = _quantize("w8a8_sq_per_tensor", TRTLLM_SQ_PLUGIN, UP_PROJ, weights, stats, norm)
    assert torch.equal(plugin.smoothing.norm, (norm / s).to(F16))
    _, plugin, _ = _quantize("w8a8_sq_per_tensor", TRTLLM_SQ_PLUGIN, O_PROJ, weights, stats)
    s_o = sq.smoothing_factors(stats.linear(0, O_PROJ).x_absmax, [weights[O_PROJ]], 0.5)
    assert torch.equal(plugin.smoothing.smoother, s_o)
    assert plugin.input_amax == float((stats.linear(0, O_PROJ).x_absmax / s_o).max())


@pytest.mark.parametrize("form", list(ALL_FORMS))
@pytest.mark.parametrize("algo", [a for a, v in ALGORITHMS.items() if v.quantizes_weights])
def test_declared_specs_are_what_quantize_returns(algo, form):
    weights = _weights()
    stats = _stats(weights)
    norm = torch.ones(32)
    for projection, follows_norm in ((O_PROJ, False), (UP_PROJ, True)):
        quantizer, _, q = _quantize(algo, ALL_FORMS[form], projection, weights, stats, norm if follows_norm else None)
        produced = {f: (v.dtype, tuple(v.shape)) for f in ("codes", "weight_scale", "weight_scale_2", "input_scale",
                                                            "prequant") if (v := getattr(q, f)) is not None}
        assert quantizer.specs((48, 32), follows_norm) == produced


def _load(directory) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("algo", ["fp8", "w8a16", "w4a16_awq"])
def test_rank_file_and_hf_layouts_hold_the_same_values(quant_model, calibration, hf_exported, tmp_path, algo):
    """The quantize stage's artifact and the hf-modelopt export, where the two forms agree: projections
    that no norm precedes and that trtllm-build does not fuse (o_proj, down_proj)."""
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = calibration
    quantize_checkpoint(quant_model, stats, QuantSettings(algo, group_size=64), "float16", tmp_path)
    trt, hf = _load(tmp_path), _load(hf_exported("hf-modelopt", algo, "none"))
    for layer in range(4):
        for proj, linear in ((O_PROJ, "attention.dense"), ("mlp.down_proj", "mlp.proj")):
            p, m = f"model.layers.{layer}.{proj}.", f"model.layers.{layer}.{linear}."
            if algo == "w8a16":
                assert torch.equal(trt[p + "weight_only_scale"], hf[p + "weight_scale"])
            elif algo == "fp8":
                assert torch.equal(trt[p + "qweight"].view(torch.uint8), hf[p + "weight"].view(torch.uint8))
                assert torch.equal(trt[m + "weights_scaling_factor"], hf[p + "weight_scale"].reshape(1))
                assert torch.equal(trt[m + "activation_scaling_factor"], hf[p + "input_scale"].reshape(1))
            else:
                assert torch.equal(trt[m + "prequant_scaling_factor"], hf[p + "pre_quant_scale"])
                assert torch.allclose(trt[p + "weights_scaling_factor"], hf[p + "weight_scale"], rtol=1e-6)
