"""smoothquant_alpha: auto: the recipe rules, the calibrate key, the search's two steps (each group's choice
and the candidate kept by the next-token loss: minimal by construction and recomputed independently),
determinism, and a verified build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipe_runner.calibration.stats import read_stats
from recipe_runner.errors import RecipeError
from recipe_runner.pipeline.build import run_build
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.quant import smoothquant as sq
from recipe_runner.quant.sq_auto import GRID, PER_LAYER, REPORT_FILE, AlphaSearch, mean_alpha
from recipe_runner.recipe import load_recipe
from recipe_runner.store.cache import CacheStore
from tests.dequantize import dequantize_int8

ALGO = "w8a8_sq_per_channel_per_token"
GROUPS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")

RECIPE = """\
recipe_version: 1
name: sq-auto
source:
  path: {model}
  dtype: float16
quantization:
  algo: {algo}
  smoothquant_alpha: {alpha}
  calibration:
    dataset: {dataset}
    num_samples: 8
    max_seq_len: 24
    batch_size: 4
output:
  dir: {out}
  targets: {targets}
{verify}"""
VERIFY = """verify:
  prompts: ["The capital of France is", "def fibonacci(n):"]
"""


def write_recipe(tmp_path: Path, model, dataset, *, algo=ALGO, alpha="auto", targets="[trtllm-checkpoint]",
                 verify="", name="r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(model=model, algo=algo, alpha=alpha, dataset=dataset, out=tmp_path / f"out-{name}",
                                  targets=targets, verify=verify))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return [str(p) for p in exc.value.problems]


# ---- the recipe ------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["w8a8_sq_per_channel", "w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor"])
def test_auto_is_accepted_with_every_smoothquant_algo(tmp_path, algo):
    recipe = load_recipe(write_recipe(tmp_path, "model", "calib.txt", algo=algo))
    assert recipe.data["quantization"]["smoothquant_alpha"] == "auto"


@pytest.mark.parametrize("value", ["autox", "1.5", "-0.1", "'0.5'", "[0.5]", "true"])
def test_bad_values_are_refused_at_their_line(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)  # messages name the file relative to the current directory
    problems = _problems(write_recipe(tmp_path, "model", "calib.txt", alpha=value))
    assert len(problems) == 1
    assert problems[0].startswith("r.yaml:8:22: quantization.smoothquant_alpha: ")
    assert problems[0].endswith("is not allowed; it must be a number from 0 to 1 or 'auto'")


@pytest.mark.parametrize("algo", ["fp8", "w4a16_awq", "w8a16", "none"])
def test_auto_with_an_algo_that_is_not_smoothquant_is_refused(tmp_path, monkeypatch, algo):
    monkeypatch.chdir(tmp_path)
    problems = _problems(write_recipe(tmp_path, "model", "calib.txt", algo=algo))
    assert problems == [f"r.yaml:8:22: quantization.smoothquant_alpha: auto searches SmoothQuant's alpha, but algo "
                        f"{algo} is not SmoothQuant; use one of w8a8_sq_per_channel, w8a8_sq_per_channel_per_token, "
                        "w8a8_sq_per_tensor, or remove smoothquant_alpha"]


def test_an_integer_alpha_keeps_its_canonical_form(tmp_path):
    """The schema's anyOf must not change how numeric recipes hash: 1 is still 1.0."""
    one = load_recipe(write_recipe(tmp_path, "model", "calib.txt", alpha="1", name="a"))
    other = load_recipe(write_recipe(tmp_path, "model", "calib.txt", alpha="1.0", name="a"))
    assert one.data["quantization"]["smoothquant_alpha"] == 1.0
    assert '"smoothquant_alpha":1.0' in one.canonical_json() and one.canonical_hash() == other.canonical_hash()


# ---- the calibrate key -----------------------------------------------------------------------------

def _params(tmp_path, model, dataset, **kw) -> dict:
    plan = make_plan(load_recipe(write_recipe(tmp_path, model, dataset, **kw)))
    return {s.name: dict(s.params) for s in plan.stages}


def test_the_calibrate_key_holds_the_search_only_with_auto(quant_model, calib_file, tmp_path):
    half = _params(tmp_path, quant_model, calib_file, alpha="0.5")
    other = _params(tmp_path, quant_model, calib_file, alpha="0.8")
    auto = _params(tmp_path, quant_model, calib_file)
    assert half["calibrate"] == other["calibrate"] and "smoothquant_search" not in half["calibrate"]
    assert half["quantize"] != other["quantize"]
    assert auto["calibrate"]["smoothquant_search"] == {"algo": ALGO, "grid": list(GRID), "tokens": 1024,
                                                     "select_tokens": 2048}
    assert {k: v for k, v in auto["calibrate"].items() if k != "smoothquant_search"} == half["calibrate"]
    assert auto["quantize"]["smoothquant_alpha"] == "auto"
    # the error is measured with the algo's own quantization, so another algo searches anew
    tensor = _params(tmp_path, quant_model, calib_file, algo="w8a8_sq_per_tensor")
    assert tensor["calibrate"]["smoothquant_search"]["algo"] == "w8a8_sq_per_tensor"
    assert GRID == tuple(i / 20 for i in range(21)) and GRID[10] == 0.5


def test_numeric_alpha_changes_reuse_calibration_and_auto_recalibrates(quant_model, calib_file, tmp_path):
    store = CacheStore(tmp_path / "cache")

    def actions(**kw):
        result = run_build(make_plan(load_recipe(write_recipe(tmp_path, quant_model, calib_file, **kw))), store=store,
                           echo=lambda _: None)
        return {t["stage"]: t["action"] for t in result.trace}

    assert actions(alpha="0.5")["calibrate"] == "ran"
    assert actions(alpha="0.7") == {"convert": "cached", "calibrate": "cached", "quantize": "ran", "shard": "ran"}
    assert actions()["calibrate"] == "ran"
    assert actions() == {"convert": "cached", "calibrate": "cached", "quantize": "cached", "shard": "cached"}


# ---- the search on quant_model ---------------------------------------------------------------------

def _auto_settings(calib_file, algo=ALGO):
    from recipe_runner.stages.calibrate import CalibrationSettings

    # the session `calibration` fixture's data settings, with the search
    return CalibrationSettings("calib.txt", calib_file, num_samples=12, max_seq_len=24, seed=0, batch_size=4,
                               statistics=("smoothquant",), smoothquant_search=AlphaSearch(algo))


@pytest.fixture(scope="module")
def auto_stats(quant_model, calib_file, tmp_path_factory):
    from recipe_runner.stages.calibrate import calibrate

    out = tmp_path_factory.mktemp("auto-stats")
    calibrate(quant_model, _auto_settings(calib_file), out)
    return read_stats(out), out


def test_the_chosen_alpha_is_the_smallest_error_of_the_grid(auto_stats):
    stats, _ = auto_stats
    assert sorted(stats.alphas) == sorted((layer, g) for layer in range(4) for g in GROUPS)
    improved = 0
    for (layer, group), choice in stats.alphas.items():
        assert len(choice.errors) == len(GRID) and all(e > 0 for e in choice.errors)
        best = choice.error(GRID)
        assert all(best <= e for e in choice.errors), (layer, group)  # ≤ every fixed α of the grid
        assert choice.alpha == min(GRID, key=lambda a: (choice.error_at(GRID, a), a))  # ties: the smaller α
        improved += best < choice.error_at(GRID, 0.5)
    assert improved >= len(stats.alphas) // 2  # on this model most groups do better than the default


def _layer_inputs(model_dir, calib_file, layer: int) -> dict[str, torch.Tensor]:
    """The real-token inputs of `layer`'s input groups, from a whole-model HF forward with hooks over the
    calibrate stage's batches (which keep every row here: 4 x 24 tokens per batch < the row quota)."""
    import transformers

    from recipe_runner.calibration.dataset import locate_dataset, read_texts, sample_texts
    from recipe_runner.calibration.tokens import load_tokenizer, make_batches, tokenize

    settings = _auto_settings(calib_file)
    files = locate_dataset(settings.dataset, settings.dataset_path, settings.split, None)
    texts = sample_texts(read_texts(files, settings.text_field), settings.num_samples, settings.seed)
    batches = make_batches(tokenize(load_tokenizer(model_dir), texts, settings.max_seq_len), settings.batch_size, 1001)
    assert max(b.ids.numel() for b in batches) * len(batches) <= AlphaSearch(ALGO).tokens
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    seen: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    mask = {}
    for g in GROUPS:
        module = model.get_submodule(f"model.layers.{layer}.{g}")
        module.register_forward_hook(lambda m, i, o, g=g: seen[g].append(i[0][mask["now"]]))
    with torch.no_grad():
        for batch in batches:
            mask["now"] = batch.mask
            model(batch.ids)
    return {g: torch.cat(xs) for g, xs in seen.items()}


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def test_the_errors_recomputed_independently_for_one_layer(auto_stats, quant_model, calib_file, hf_tensors):
    """E(α) from the SmoothQuant formulas written out here (per-channel int8 weights, per-token int8
    activations), on inputs from a whole-model forward: the same errors, the same choice."""
    stats, _ = auto_stats
    layer = 1
    inputs = _layer_inputs(quant_model, calib_file, layer)
    hf = hf_tensors(quant_model)
    members = {"self_attn.q_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
               "mlp.gate_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
    for group, names in members.items():
        prefix = f"model.layers.{layer}.{group.split('.')[0]}."
        weights = [hf[prefix + n + ".weight"].double() for n in names]
        x = inputs[group].double()
        a = stats.linear(layer, group).x_absmax
        errors = []
        for alpha in GRID:
            s = sq.smoothing_factors(a, [w.float() for w in weights], alpha).double()
            xq = _per_token_int8(x / s)
            err = 0.0
            for w in weights:
                wq = dequantize_int8(sq.quantize_int8_per_channel((w * s).float())).double()
                err += float(((xq @ wq.T) - x @ w.T).square().sum())
            errors.append(err)
        recorded = stats.alphas[(layer, group)]
        # rtol: an int8 rounding may flip between float32 (the search) and float64 (here)
        torch.testing.assert_close(torch.tensor(recorded.errors), torch.tensor(errors), rtol=1e-3, atol=0)
        assert recorded.alpha == GRID[min(range(len(GRID)), key=lambda i: errors[i])], group


def test_the_kept_candidate_has_the_smallest_loss(auto_stats):
    stats, _ = auto_stats
    selection = stats.alpha_selection
    losses = dict(selection.losses)
    assert list(losses) == [PER_LAYER, *GRID] and selection.tokens > 0
    assert all(2.0 < loss < 20.0 for loss in losses.values())  # a random 4-layer model: near log(vocab)
    assert losses[selection.chosen] == min(losses.values())
    assert len(set(losses.values())) > 10  # the candidates really differ
    for (layer, group), choice in stats.alphas.items():
        kept = stats.smoothquant_alpha(layer, group)
        assert kept == (choice.alpha if selection.chosen == PER_LAYER else selection.chosen)


def _whole_model_loss(model, batches, quantize_layer) -> float:
    """Mean next-token loss of a whole-model HF forward, each decoder layer's projections swapped by
    `quantize_layer(index, layer)` (a context manager), over the real tokens of `batches`."""
    from contextlib import ExitStack

    total, count = 0.0, 0
    with torch.no_grad(), ExitStack() as stack:
        for index, layer in enumerate(model.model.layers):
            stack.enter_context(quantize_layer(index, layer))
        for batch in batches:
            logp = torch.log_softmax(model(batch.ids).logits.double(), dim=-1)
            valid = batch.mask[:, :-1] & batch.mask[:, 1:]
            nll = -logp[:, :-1].gather(-1, batch.ids[:, 1:, None])[..., 0]
            total += float(nll[valid].sum())
            count += int(valid.sum())
    return total / count


def test_the_candidate_losses_recomputed_by_a_whole_model_forward(auto_stats, quant_model, calib_file):
    """Each candidate's loss from the layer-by-layer lockstep equals a whole-model HF forward (float64
    log-softmax over all logits) with the same fake-quantized projections, on the same tokens; and the
    fake-quantized projection is the SmoothQuant formula written out here."""
    import transformers

    from recipe_runner.calibration.alpha_select import FakeQuantLinear, fake_quantized, selection_batches
    from recipe_runner.calibration.dataset import locate_dataset, read_texts, sample_texts
    from recipe_runner.calibration.tokens import load_tokenizer, make_batches, tokenize
    from recipe_runner.models.llama import LLAMA

    stats, _ = auto_stats
    settings = _auto_settings(calib_file)
    files = locate_dataset(settings.dataset, settings.dataset_path, settings.split, None)
    texts = sample_texts(read_texts(files, settings.text_field), settings.num_samples, settings.seed)
    batches = make_batches(tokenize(load_tokenizer(quant_model), texts, settings.max_seq_len), settings.batch_size, 1001)
    chosen = selection_batches(batches, AlphaSearch(ALGO).select_tokens)
    assert sum(b.tokens for b in chosen) == stats.alpha_selection.tokens + sum(int(b.mask[:, 0].sum()) for b in chosen)
    model = transformers.LlamaForCausalLM.from_pretrained(quant_model, dtype=torch.float32, attn_implementation="eager")
    losses = dict(stats.alpha_selection.losses)
    search = AlphaSearch(ALGO)
    for candidate in (PER_LAYER, 0.0, 0.5, 1.0):
        got = _whole_model_loss(model, chosen, lambda i, lay: fake_quantized(lay, LLAMA, stats, i, search, candidate))
        assert got == pytest.approx(losses[candidate], rel=1e-5, abs=0), candidate
    layer = model.model.layers[2]
    x = torch.randn(5, layer.self_attn.o_proj.in_features)
    w = layer.self_attn.o_proj.weight.detach()
    s = sq.smoothing_factors(stats.linear(2, "self_attn.o_proj").x_absmax, [w], 0.5)
    want = _per_token_int8(x / s) @ dequantize_int8(sq.quantize_int8_per_channel(w * s)).T
    with fake_quantized(layer, LLAMA, stats, 2, search, 0.5):
        fake = layer.self_attn.o_proj
        assert isinstance(fake, FakeQuantLinear)
        torch.testing.assert_close(fake(x), want, rtol=1e-5, atol=1e-5)
    assert type(layer.self_attn.o_proj) is torch.nn.Linear  # the float projection is back


def test_two_searches_give_identical_bytes(auto_stats, quant_model, calib_file, tmp_path):
    from recipe_runner.stages.calibrate import calibrate

    _, first = auto_stats
    calibrate(quant_model, _auto_settings(calib_file), tmp_path)
    for name in ("calibration.json", "statistics.safetensors"):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name


def test_quantize_uses_each_layers_alpha(auto_stats, quant_model, tmp_path, hf_tensors):
    """The plugin form's dense smoother is s at the α searched for that layer's o_proj; config.json says
    their mean."""
    from safetensors.torch import load_file

    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = auto_stats
    artifact = quantize_checkpoint(quant_model, stats, QuantSettings(ALGO, smoothquant_alpha="auto"), "float16",
                                   tmp_path)
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(f))
    hf = hf_tensors(quant_model)
    for layer in range(4):
        alpha = stats.smoothquant_alpha(layer, "self_attn.o_proj")
        colmax = hf[f"model.layers.{layer}.self_attn.o_proj.weight"].float().abs().amax(0)
        want = sq.factors_from_column_max(stats.linear(layer, "self_attn.o_proj").x_absmax, colmax, alpha)
        assert torch.equal(tensors[f"model.layers.{layer}.attention.dense.smoother"], want)
    assert artifact.quant_config["smoothquant_val"] == mean_alpha(stats.alphas, stats.alpha_selection)
    assert artifact.smoothquant == stats.alpha_report()


# ---- a build ---------------------------------------------------------------------------------------

def test_a_recipe_with_auto_builds_and_passes_verify(quant_model, calib_file, tmp_path):
    recipe = write_recipe(tmp_path, quant_model, calib_file, targets="[trtllm-checkpoint, hf-compressed-tensors]",
                          verify=VERIFY)
    result = run_build(make_plan(load_recipe(recipe)), store=CacheStore(tmp_path / "cache"), echo=lambda _: None)
    assert {t["stage"] for t in result.trace} >= {"calibrate", "quantize", "shard", "export-hf-compressed-tensors",
                                                   "verify"}
    verify = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] is True and verify["tolerance_sources"]["mean_kl"].startswith("default")
    assert json.loads((result.output_dir / "verify" / "hf-compressed-tensors" / "verify.json").read_text())["passed"]
    report = json.loads((result.output_dir / "checkpoint" / REPORT_FILE).read_text())
    config = json.loads((result.output_dir / "checkpoint" / "config.json").read_text())
    assert config["quantization"]["smoothquant_val"] == report["smoothquant_val"]
    assert isinstance(report["smoothquant_val"], float) and 0 <= report["smoothquant_val"] <= 1
    assert report["search"] == AlphaSearch(ALGO).params()
    assert [entry["layer"] for entry in report["layers"]] == [0, 1, 2, 3]
    for entry in report["layers"]:
        assert sorted(entry["groups"]) == sorted(GROUPS)
        for g in entry["groups"].values():
            assert g["group_alpha"] in GRID and g["group_error"] == min(g["errors"])
            assert g["group_error"] <= g["error_at_default_alpha"] and g["error"] == g["errors"][GRID.index(g["alpha"])]
            assert g["alpha"] == (g["group_alpha"] if report["selection"]["chosen"] == PER_LAYER
                                  else report["selection"]["chosen"])
    losses = {c["alpha"]: c["loss"] for c in report["selection"]["candidates"]}
    assert list(losses) == [PER_LAYER, *GRID] and report["selection"]["tokens"] > 0
    assert losses[report["selection"]["chosen"]] == min(losses.values())
    assert json.loads((result.output_dir / "hf-compressed-tensors" / REPORT_FILE).read_text()) == report


def test_the_api_search_is_the_calibrate_stages(auto_stats, quant_model, calib_file):
    from recipe_runner.api import smoothquant_alpha_search

    stats, _ = auto_stats
    result = smoothquant_alpha_search(quant_model, calib_file, algo=ALGO, num_samples=12, max_seq_len=24, batch_size=4)
    assert result.selection == stats.alpha_selection and dict(result.alphas) == stats.alphas
    assert result.kept() == {key: stats.smoothquant_alpha(*key) for key in stats.alphas}
    assert result.report() == stats.alpha_report()
