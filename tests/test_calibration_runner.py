"""Layer-by-layer calibration gives the statistics of a whole-model forward with hooks."""
from __future__ import annotations

import pytest
import torch

from recipe_runner.calibration.runner import RunnerOptions, run_calibration
from recipe_runner.calibration.tokens import load_tokenizer, make_batches, tokenize
from tests.conftest import calibration_texts


def _batches(model_dir, batch_size: int, max_seq_len: int = 40):
    sequences = tokenize(load_tokenizer(model_dir), calibration_texts()[:9], max_seq_len)
    return make_batches(sequences, batch_size, 1001)


def _whole_model_stats(model_dir, batches, architecture="LlamaForCausalLM"):
    import transformers

    model = getattr(transformers, architecture).from_pretrained(model_dir, dtype=torch.float32,
                                                                attn_implementation="eager")
    stats: dict[str, list[torch.Tensor]] = {}
    current = {}

    def hook(name):
        def record(module, inputs, output):
            x, y = inputs[0][current["mask"]].abs(), output[current["mask"]].abs()
            old = stats.get(name)
            stats[name] = [x.amax(0), y.amax(0)] if old is None else [torch.maximum(old[0], x.amax(0)),
                                                                         torch.maximum(old[1], y.amax(0))]
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_hook(hook(name.removeprefix("model.layers.")))
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch.mask
            model(batch.ids)
    return stats


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_layer_by_layer_equals_a_whole_model_forward(tiny_model, variant):
    kwargs = {"with_tokenizer": True}
    if variant == "mistral":
        kwargs.update(architecture="MistralForCausalLM", torch_dtype="bfloat16")
    model = tiny_model(**kwargs)
    batches = _batches(model, batch_size=4)
    assert any(not bool(b.mask.all()) for b in batches)  # padded batches are part of the check
    got = run_calibration(model, batches)
    want = _whole_model_stats(model, batches, "MistralForCausalLM" if variant == "mistral" else "LlamaForCausalLM")
    assert len(got.linears) == 4 * 7
    for (layer, proj), s in got.linears.items():
        x, y = want[f"{layer}.{proj}"]
        torch.testing.assert_close(s.x_absmax, x, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s.y_absmax, y, rtol=1e-6, atol=1e-7)


def test_batching_and_spilling_do_not_change_the_statistics(quant_model):
    one = run_calibration(quant_model, _batches(quant_model, batch_size=1))
    padded = run_calibration(quant_model, _batches(quant_model, batch_size=3), RunnerOptions(spill_bytes=0))
    for key, s in one.linears.items():
        torch.testing.assert_close(padded.linears[key].x_absmax, s.x_absmax, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded.linears[key].y_absmax, s.y_absmax, rtol=1e-5, atol=1e-6)


def test_statistics_round_trip_through_the_artifact(calibration):
    from recipe_runner.calibration.stats import read_stats

    stats, directory = calibration
    again = read_stats(directory)
    assert again.meta["tokens"] == stats.meta["tokens"] > 0
    for key, s in stats.linears.items():
        assert torch.equal(again.linears[key].x_absmax, s.x_absmax)
        assert torch.equal(again.linears[key].x_absmean, s.x_absmean)
    for key, r in stats.awq.items():
        assert torch.equal(again.awq[key].scales, r.scales) and again.awq[key].alpha == r.alpha


def _whole_model_k_after_rope(model_dir, batches) -> dict[int, float]:
    """max |key_states| handed to the attention interface, per layer, over real tokens, from a whole-model
    forward with transformers' apply_rotary_pos_emb patched to record its output."""
    import transformers
    from transformers.models.llama import modeling_llama as m

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    original = m.apply_rotary_pos_emb
    order: list[torch.Tensor] = []
    seen: dict[int, float] = {}
    current = {}

    def recording(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original(q, k, cos, sin, *args, **kwargs)
        order.append(k_embed)  # [B, n_kv, T, head_dim], one call per layer in order
        return q_embed, k_embed

    m.apply_rotary_pos_emb = recording
    try:
        with torch.no_grad():
            for batch in batches:
                order.clear()
                current["mask"] = batch.mask
                model(batch.ids)
                assert len(order) == model.config.num_hidden_layers
                for layer, k in enumerate(order):
                    v = float(k.transpose(1, 2)[batch.mask].abs().amax())
                    seen[layer] = max(seen.get(layer, 0.0), v)
    finally:
        m.apply_rotary_pos_emb = original
    return seen


def test_k_after_rope_amax_equals_a_whole_model_forward(quant_model):
    batches = _batches(quant_model, batch_size=4)
    assert any(not bool(b.mask.all()) for b in batches)  # padding must be masked out
    got = run_calibration(quant_model, batches)
    want = _whole_model_k_after_rope(quant_model, batches)
    assert sorted(got.k_rope_absmax) == sorted(want) == [0, 1, 2, 3]
    for layer, amax in want.items():
        assert got.k_rope_absmax[layer].shape == ()
        assert float(got.k_rope_absmax[layer]) == pytest.approx(amax, rel=1e-6)
        # RoPE mixes pairs of channels: never beyond √2 of the pre-RoPE amax, and here it differs from it
        y = float(got.linears[(layer, "self_attn.k_proj")].y_absmax.max())
        assert float(got.k_rope_absmax[layer]) <= y * 2 ** 0.5 * (1 + 1e-6)
    assert any(float(got.k_rope_absmax[i]) != float(got.linears[(i, "self_attn.k_proj")].y_absmax.max())
               for i in want)


def test_k_after_rope_amax_round_trips_and_old_artifacts_still_read(calibration, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from recipe_runner.calibration.stats import STATS_FILE, read_stats
    from recipe_runner.errors import UserError

    stats, directory = calibration
    assert sorted(stats.k_rope_absmax) == [0, 1, 2, 3]
    again = read_stats(directory)
    assert set(again.linears) == set(stats.linears)  # the per-layer tensor is no linear
    for layer, amax in stats.k_rope_absmax.items():
        assert torch.equal(again.k_rope_absmax[layer], amax.float())
        assert again.k_after_rope_amax(layer) == float(amax)
    # an artifact written before the field existed: still readable, the k amax asks for a rebuild
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    tensors = {k: v for k, v in load_file(str(old / STATS_FILE)).items() if "k_rope_absmax" not in k}
    save_file(tensors, str(old / STATS_FILE))
    legacy = read_stats(old)
    assert set(legacy.linears) == set(stats.linears) and not legacy.k_rope_absmax
    with pytest.raises(UserError, match="rebuild the calibrate stage"):
        legacy.k_after_rope_amax(0)
