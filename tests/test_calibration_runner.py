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
