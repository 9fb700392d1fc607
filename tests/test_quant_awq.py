"""INT4 AWQ: group-wise rounding, the activation-aware scale search, and the checkpoint tensors."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from recipe_runner.quant import awq
from recipe_runner.quant.packing import unpack_int4_rows


def test_groupwise_dequantization_is_within_half_a_group_step():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    for g in (64, 128):
        scales = awq.group_scales(w, g)
        assert scales.shape == (32, 256 // g)
        codes = awq.quantize_groupwise(w, scales, g)
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
        step = scales.repeat_interleave(g, dim=1)
        assert torch.all((awq.dequantize_groupwise(codes, scales, g) - w).abs() <= step / 2 * (1 + 1e-6))


def test_search_prefers_activation_aware_scales_when_activations_have_outliers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 30.0  # salient input channels
    weights = [torch.randn(64, 128, generator=gen) * 0.02, torch.randn(32, 128, generator=gen) * 0.02]
    result = awq.search_scales(x, weights, x.abs().mean(0), group_size=64)
    assert len(result.errors) == 20 and result.plain_error == result.errors[0]
    assert result.alpha > 0 and result.best_error < 0.9 * result.plain_error
    recomputed = sum(awq.scaled_output_error(x, w, result.scales, 64) for w in weights)
    assert abs(recomputed - result.best_error) <= 1e-9 * result.best_error


def test_calibrated_scales_never_do_worse_than_plain_rounding(calibration):
    """On the calibration batch, for every layer and input group, the chosen α's output error is at
    most plain group-wise rounding's (α = 0), and strictly lower for most groups."""
    stats, _ = calibration
    better = 0
    for (layer, group), result in stats.awq.items():
        assert min(result.errors) == result.errors[round(result.alpha * 20)]
        assert min(result.errors) <= result.errors[0]
        better += min(result.errors) < result.errors[0]
    assert len(stats.awq) == 16 and better >= 8


def test_awq_checkpoint_tensors_reconstruct_the_weights(quant_model, calibration, tmp_path, hf_tensors):
    """ModelOpt's layout: packed int8 [out/2, in], group scales fp32 [out, in/group] = group amax/7 of
    W/prequant, prequant_scaling_factor [in] in the model dtype = 1/s."""
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = calibration
    quantize_checkpoint(quant_model, stats, QuantSettings("w4a16_awq", group_size=64), "float16", tmp_path)
    t: dict[str, torch.Tensor] = {}
    for f in tmp_path.glob("*.safetensors"):
        t.update(load_file(f))
    hf = hf_tensors(quant_model)
    p = "model.layers.3."
    for proj, module in (("self_attn.v_proj", "attention.qkv"), ("mlp.down_proj", "mlp.proj")):
        w = hf[p + proj + ".weight"].float()
        packed, scales = t[p + proj + ".qweight"], t[p + proj + ".weights_scaling_factor"]
        pq = t[p + module + ".prequant_scaling_factor"]
        assert packed.dtype == torch.int8 and packed.shape == (w.shape[0] // 2, w.shape[1])
        assert scales.dtype == torch.float32 and scales.shape == (w.shape[0], w.shape[1] // 64)
        assert pq.dtype == torch.float16 and pq.shape == (w.shape[1],)
        group = scales.repeat_interleave(64, dim=1)
        effective = unpack_int4_rows(packed).float() * group * pq.float()[None, :]
        assert torch.all((effective - w).abs() <= group / 2 * pq.float()[None, :] * (1 + 1e-5) + 1e-7)
    first = {"attention.qkv": "self_attn.q_proj", "mlp.proj": "mlp.down_proj"}
    for module, group_name in first.items():
        expected = (1.0 / stats.awq_scales(3, group_name)).half()
        assert torch.equal(t[p + module + ".prequant_scaling_factor"], expected)


def test_awq_search_off_is_round_to_nearest_with_the_same_group_scales(quant_model, calib_file, tmp_path, hf_tensors):
    """awq_search false: every scale is 1, so the checkpoint is plain group-wise rounding of W (the
    baseline AWQ is measured against), in the same W4A16_AWQ form; the statistics say so."""
    import json

    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.calibrate import CalibrationSettings, calibrate
    from recipe_runner.stages.quantize import quantize_checkpoint

    settings = CalibrationSettings("calib.txt", calib_file, num_samples=4, max_seq_len=16, seed=0, batch_size=4,
                                   statistics=("awq",), group_size=64, awq_search=False)
    (tmp_path / "stats").mkdir()
    stats = calibrate(quant_model, settings, tmp_path / "stats")
    assert stats.awq and all(r.alpha == 0.0 and len(r.errors) == 1 and torch.equal(r.scales, torch.ones_like(r.scales))
                             for r in stats.awq.values())
    assert stats.meta["awq_search"] is False
    assert json.loads((tmp_path / "stats" / "calibration.json").read_text())["awq_search"] is False
    (tmp_path / "q").mkdir()
    quantize_checkpoint(quant_model, stats, QuantSettings("w4a16_awq", group_size=64), "float16", tmp_path / "q")
    t: dict[str, torch.Tensor] = {}
    for f in (tmp_path / "q").glob("*.safetensors"):
        t.update(load_file(f))
    w = hf_tensors(quant_model)["model.layers.2.mlp.down_proj.weight"].float()
    scales = awq.group_scales(w, 64)
    assert torch.equal(t["model.layers.2.mlp.down_proj.weights_scaling_factor"], scales)
    assert torch.equal(unpack_int4_rows(t["model.layers.2.mlp.down_proj.qweight"]), awq.quantize_groupwise(w, scales, 64))
    assert torch.all(t["model.layers.2.mlp.proj.prequant_scaling_factor"] == 1)


AWQ_RECIPE = """\
recipe_version: 1
name: awq
source:
  path: {model}
quantization:
  algo: {algo}
  group_size: 64
{search}  calibration:
    dataset: {dataset}
"""


def _awq_recipe(tmp_path, model, dataset, *, algo="w4a16_awq", search=None):
    path = tmp_path / "r.yaml"
    line = "" if search is None else f"  awq_search: {search}\n"
    path.write_text(AWQ_RECIPE.format(model=model, dataset=dataset, algo=algo, search=line))
    return path


def test_awq_search_enters_the_calibrate_key_only_when_off(quant_model, calib_file, tmp_path):
    """Recipes that search keep their keys (no rebuild of AWQ builds from before the field existed)."""
    from recipe_runner.pipeline.plan import make_plan
    from recipe_runner.recipe import load_recipe

    def calibrate_params(search):
        plan = make_plan(load_recipe(_awq_recipe(tmp_path, quant_model, calib_file, search=search)))
        return dict(next(s for s in plan.stages if s.name == "calibrate").params)

    default, on, off = calibrate_params(None), calibrate_params("true"), calibrate_params("false")
    assert default == on and "awq_search" not in default
    assert off == {**default, "awq_search": False}


def test_awq_search_off_with_another_algo_is_refused_at_its_line(quant_model, calib_file, tmp_path, monkeypatch):
    import pytest

    from recipe_runner.errors import RecipeError
    from recipe_runner.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as exc:
        load_recipe(_awq_recipe(tmp_path, quant_model, calib_file, algo="fp8", search="false"))
    assert [str(p) for p in exc.value.problems] == [
        "r.yaml:8:15: quantization.awq_search: false turns off AWQ's scale search, but algo fp8 has none; "
        "use algo w4a16_awq, or remove awq_search"]


# ---- the batched search against the straightforward one ---------------------------------------------

def _reference_output_error(x, weight, s, group_size, chunk_elements=1 << 24):
    """The search's error as first written: per α and weight, row chunks fake-quantized through int8
    codes, x @ diffᵀ, squared and summed in float64, partials added in row order."""
    x = x.float()
    rows = max(1, chunk_elements // max(x.shape[0], weight.shape[1]))
    total = 0.0
    for r0 in range(0, weight.shape[0], rows):
        chunk = weight[r0:r0 + rows].float()
        out, inp = chunk.shape
        ws = (chunk * s[None, :]).reshape(out, inp // group_size, group_size)
        scales = (torch.maximum(ws.amax(dim=2), -ws.amin(dim=2)) / 7).clamp(min=torch.finfo(torch.float32).tiny)
        codes = (ws / scales[:, :, None]).round_().clamp_(-8, 7).reshape(out, inp).to(torch.int8)
        deq = (codes.float().reshape(out, inp // group_size, group_size) * scales[:, :, None]).reshape(out, inp)
        diff = deq / s[None, :] - chunk
        total += float((x @ diff.T).double().pow(2).sum())
    return total


def _reference_search(x, weights, x_mean, group_size, chunk_elements, grid=20):
    def cand(alpha):
        s = x_mean.float().pow(alpha).clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    errors = [sum(_reference_output_error(x, w, cand(i / grid), group_size, chunk_elements) for w in weights)
              for i in range(grid)]
    best = min(range(grid), key=lambda i: (errors[i], i))
    return best / grid, cand(best / grid), errors


def test_search_is_bit_identical_to_the_straightforward_search(monkeypatch):
    """Several groups (the block and chunk loops both split rows, with a ragged last chunk, and every
    weight of the group spans several fake-quantization blocks): α, scales and every grid error equal
    the reference's exactly, not within a tolerance."""
    gen = torch.Generator().manual_seed(7)
    monkeypatch.setattr(awq, "_BLOCK_ELEMENTS", 3 * 256)  # blocks of 3 rows of 256: ragged, many blocks
    chunk = 1 << 14  # error chunks of 64 rows at 256 tokens: ragged last chunks below
    monkeypatch.setattr(awq, "_CHUNK_ELEMENTS", chunk)
    x = torch.randn(256, 256, generator=gen)
    x[:, 3] *= 40.0
    x[:, 100:104] *= 8.0
    groups = [[torch.randn(150, 256, generator=gen) * 0.02, torch.randn(70, 256, generator=gen) * 0.05],
              [torch.randn(64, 256, generator=gen).half()],  # a half weight: converted per chunk, as before
              [torch.randn(200, 256, generator=gen) * 0.01, torch.randn(33, 256, generator=gen) * 0.01,
               torch.randn(130, 256, generator=gen) * 0.1]]
    chosen = set()
    for weights in groups:
        for group_size in (64, 128):
            alpha, scales, errors = _reference_search(x, weights, x.abs().mean(0), group_size, chunk)
            result = awq.search_scales(x, weights, x.abs().mean(0), group_size)
            assert result.errors == tuple(errors) and result.alpha == alpha and torch.equal(result.scales, scales)
            chosen.add(alpha)
            s = awq.candidate_scales(x.abs().mean(0), 0.35)
            for w in weights:  # the single-weight error too
                assert awq.scaled_output_error(x, w, s, group_size) == _reference_output_error(x, w, s, group_size, chunk)
    assert len(chosen) > 1  # not one α everywhere
