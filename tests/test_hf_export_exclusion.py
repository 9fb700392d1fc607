"""HF targets beyond "quantize every linear": the KV-only hf-modelopt checkpoint (algo none + FP8 KV
cache), per-module `exclude_modules`, and the plan-time width checks of the packed formats."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.pipeline.build import run_build
from recipe_runner.store.cache import CacheStore
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from recipe_runner.reference.hf_quant_format import HFCheckpointError, detect_format
from recipe_runner.verify.run import verify_checkpoint
from tests.conftest import load_hf_tensors
from tests.recipe_files import run_cli
from tests.test_hf_export_build import write_recipe
from tests.test_hf_export_formats import OUT, expected

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Explain tensor parallelism in one sentence:"]
F16, F32 = torch.float16, torch.float32
MODELOPT_PRODUCER = {"name": "modelopt", "version": "0.47.0"}


def _src(model) -> dict[str, torch.Tensor]:
    return {k: v.to(F16) for k, v in load_hf_tensors(model).items()}


# ---- KV-only ---------------------------------------------------------------------------------------

def test_kv_only_checkpoint_keeps_every_weight_and_adds_post_rope_kv_scales(hf_exported, quant_model, calibration):
    stats, _ = calibration
    out = hf_exported("hf-modelopt", "none", "fp8")
    t, src = load_file(out / "model.safetensors"), _src(quant_model)
    scales = {f"model.layers.{i}.self_attn.{p}_proj.{p}_scale" for i in range(4) for p in "kv"}
    assert set(t) == set(src) | scales
    for name, value in src.items():
        assert t[name].dtype == F16 and torch.equal(t[name], value), name
    for layer in range(4):
        pre = f"model.layers.{layer}.self_attn."
        assert t[pre + "k_proj.k_scale"].dtype == F32 and t[pre + "k_proj.k_scale"].shape == ()
        assert float(t[pre + "k_proj.k_scale"]) == pytest.approx(float(stats.k_rope_absmax[layer]) / 448, rel=1e-6)
        v_amax = float(stats.linear(layer, "self_attn.v_proj").y_absmax.max())
        assert float(t[pre + "v_proj.v_scale"]) == pytest.approx(v_amax / 448, rel=1e-6)


def test_kv_only_config_files_are_modelopts_kv_only_form(hf_exported):
    out = hf_exported("hf-modelopt", "none", "fp8")
    nested = json.loads((out / "hf_quant_config.json").read_text())
    assert nested == {"producer": MODELOPT_PRODUCER,
                      "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8", "quantized_layers": {}}}
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "modelopt", "ignore": [], "producer": MODELOPT_PRODUCER,
                 "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}}


def test_kv_only_checkpoint_verifies_with_the_kv_allowance(hf_exported, quant_model, tmp_path, capsys):
    out = hf_exported("hf-modelopt", "none", "fp8")
    code, stdout, err = run_cli(capsys, "verify", str(out), "--source", str(quant_model),
                                *sum((["--prompt", p] for p in PROMPTS), []), "--report-dir", str(tmp_path / "rep"))
    report = json.loads((tmp_path / "rep" / "verify.json").read_text())
    assert code == 0, stdout + err
    assert report["checkpoint"]["quant_algo"] is None and report["checkpoint"]["kv_cache_quant_algo"] == "FP8"
    assert report["tolerance_sources"]["mean_kl"] == "default for none + FP8 KV cache"
    assert 0 < report["figures"]["max_abs_logit_error"] < 0.3  # the FP8 KV cache was simulated, nothing else


def test_kv_only_recipe_plans_and_builds_and_says_who_loads_it(quant_model, calib_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo="none", kv="fp8", targets="[hf-modelopt]")
    code, stdout, err = run_cli(capsys, "plan", str(recipe))
    assert code == 0, err
    assert ("note: hf-modelopt (none, kv_cache fp8) loads in TensorRT-LLM's PyTorch backend; vLLM refuses it"
            in stdout)
    assert "ignores the written k_scale/v_scale" in stdout
    plan = make_plan(load_recipe(recipe))
    assert [s.name for s in plan.stages] == ["convert", "calibrate", "export-hf-modelopt"]
    result = run_build(plan, store=CacheStore(tmp_path / "cache"), echo=lambda _: None)
    assert json.loads((result.output_dir / "hf-modelopt" / "hf_quant_config.json").read_text())[
        "quantization"]["kv_cache_quant_algo"] == "FP8"


# ---- exclude_modules -------------------------------------------------------------------------------

EXCLUDE = ("lm_head", "transformer.layers.1.attention.qkv", "transformer.layers.2.mlp.*",
           "transformer.layers.*.attention.dense")
EXCLUDED = {(1, p) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")} | {
    (2, p) for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {(i, "self_attn.o_proj") for i in range(4)}
EXCLUDED_PAIRS = [("hf-modelopt", "w4a16_awq", "fp8"), ("hf-modelopt", "nvfp4", "none"), ("hf-modelopt", "fp8", "none"),
                  ("hf-compressed-tensors", "w8a8_sq_per_channel", "none"), ("hf-compressed-tensors", "w4a16", "none")]


@pytest.mark.parametrize("target, algo, kv", EXCLUDED_PAIRS)
def test_excluded_projections_keep_source_weights_and_the_rest_is_unchanged(hf_exported, quant_model, target, algo,
                                                                            kv):
    t = load_file(hf_exported(target, algo, kv, EXCLUDE) / "model.safetensors")
    full = load_file(hf_exported(target, algo, kv) / "model.safetensors")
    src = _src(quant_model)
    for layer in range(4):
        for proj in OUT:
            pre = f"model.layers.{layer}.{proj}."
            kv_scale = ({f"{proj[-6]}_scale"} if kv == "fp8" and proj in ("self_attn.k_proj", "self_attn.v_proj")
                        else set())
            mine = {n[len(pre):] for n in t if n.startswith(pre)}
            if (layer, proj) in EXCLUDED:
                assert mine == {"weight"} | kv_scale, pre
                assert t[pre + "weight"].dtype == F16 and torch.equal(t[pre + "weight"], src[pre + "weight"])
            else:
                assert mine == set(expected(target, algo, proj)) | kv_scale, pre
                for suffix in mine:  # quantized exactly as without the exclusions
                    bits = [x[pre + suffix].reshape(-1).view(torch.uint8) for x in (t, full)]
                    assert torch.equal(*bits), pre + suffix
    smoothed = algo == "w4a16_awq" or algo.startswith("w8a8")
    for layer, norm in ((1, "input_layernorm"), (2, "post_attention_layernorm")):
        name = f"model.layers.{layer}.{norm}.weight"  # the excluded group's smoothing is not folded in
        assert torch.equal(t[name], src[name])
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(t[name], full[name]) and torch.equal(t[name], src[name]) != smoothed


def _names(layer_projections) -> list[str]:
    return [f"model.layers.{layer}.{p}" for layer, p in layer_projections]


def test_exclusion_lists_name_the_projections_and_the_fused_modules(hf_exported):
    listed = (["lm_head", "model.embed_tokens"] + _names([(0, "self_attn.o_proj")])
              + _names((1, p) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
              + ["model.layers.1.self_attn.qkv_proj"]
              + _names((2, p) for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
              + ["model.layers.2.mlp.gate_up_proj"] + _names([(3, "self_attn.o_proj")]))
    out = hf_exported("hf-modelopt", "nvfp4", "none", EXCLUDE)
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == listed
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == listed
    out = hf_exported("hf-compressed-tensors", "w4a16", "none", EXCLUDE)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == [n for n in listed if n != "model.embed_tokens" and not n.endswith(("qkv_proj", "gate_up_proj"))]
    assert {(layer, p) for layer in range(4) for p, q in detect_format(out).quantized_projections(layer).items()
            if not q} == EXCLUDED


@pytest.mark.parametrize("target, algo, kv", EXCLUDED_PAIRS)
def test_checkpoints_with_exclusions_verify(hf_exported, quant_model, target, algo, kv):
    result = verify_checkpoint(hf_exported(target, algo, kv, EXCLUDE), quant_model, prompts=PROMPTS)
    assert result.passed, [f.message for f in result.failures]


def _edit_config(src, dst, name, edit):
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    edit(data)
    (dst / name).write_text(json.dumps(data))
    return dst


def test_verify_refuses_exclusion_lists_the_consumers_would_read_differently(hf_exported, quant_model, tmp_path,
                                                                             capsys):
    def drop_alias(d):
        d["quantization"]["exclude_modules"].remove("model.layers.1.self_attn.qkv_proj")
    bad = _edit_config(hf_exported("hf-modelopt", "fp8", "none", EXCLUDE), tmp_path / "a", "hf_quant_config.json",
                       drop_alias)
    code, _, err = run_cli(capsys, "verify", str(bad), "--source", str(quant_model), "--prompt", PROMPTS[0])
    assert code == 1 and ("exclude_modules lists model.layers.1.self_attn.q_proj but does not match "
                          "model.layers.1.self_attn.qkv_proj") in err, err

    def split(d):
        d["quantization_config"]["ignore"].remove("model.layers.1.self_attn.k_proj")
    bad = _edit_config(hf_exported("hf-compressed-tensors", "w4a16", "none", EXCLUDE), tmp_path / "b", "config.json",
                       split)
    with pytest.raises(HFCheckpointError, match=r"splits model.layers.1.self_attn.qkv_proj: "
                                                r"self_attn.q_proj, self_attn.v_proj excluded"):
        verify_checkpoint(bad, quant_model, prompts=PROMPTS)


def test_one_recipe_excludes_the_same_layers_in_every_target(quant_model, calib_file, tmp_path):
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo="fp8", targets="[trtllm-checkpoint, hf-modelopt]")
    recipe.write_text(recipe.read_text().replace(
        "  group_size: 64\n", "  group_size: 64\n  exclude_modules: [lm_head, transformer.layers.1.*]\n"))
    result = run_build(make_plan(load_recipe(recipe)), store=CacheStore(tmp_path / "cache"), echo=lambda _: None)
    rank = load_file(result.output_dir / "checkpoint" / "rank0.safetensors")
    hf = load_file(result.output_dir / "hf-modelopt" / "model.safetensors")
    for layer, dtype in ((0, torch.float8_e4m3fn), (1, F16)):
        assert rank[f"transformer.layers.{layer}.attention.qkv.weight"].dtype == dtype
        assert rank[f"transformer.layers.{layer}.mlp.proj.weight"].dtype == dtype
        assert hf[f"model.layers.{layer}.self_attn.q_proj.weight"].dtype == dtype
        assert hf[f"model.layers.{layer}.mlp.down_proj.weight"].dtype == dtype
    assert not any(n.startswith("model.layers.1.") and n.endswith("_scale") for n in hf)


@pytest.mark.parametrize("targets, code", [("[hf-modelopt]", 2), ("[hf-compressed-tensors]", 2),
                                           ("[trtllm-checkpoint]", 0)])
def test_a_split_fused_group_is_refused_for_hf_targets(quant_model, calib_file, tmp_path, capsys, targets, code):
    algo = "w4a16" if "compressed" in targets else "w8a16"
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo=algo, targets=targets)
    recipe.write_text(recipe.read_text().replace("  group_size: 64\n", "  group_size: 64\n  exclude_modules: "
                                                 "[lm_head, transformer.layers.0.mlp.fc]\n"))
    got, _, err = run_cli(capsys, "plan", str(recipe))
    assert got == code, err
    if code:
        assert (f"quantization.exclude_modules: output targets {targets[1:-1]}: layer 0: the patterns exclude "
                "transformer.layers.0.mlp.fc (gate_proj) but not transformer.layers.0.mlp.gate (up_proj); "
                "TensorRT-LLM's PyTorch backend and vLLM fuse gate_proj and up_proj into one gate_up_proj") in err


# ---- widths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo, target, intermediate, field, message", [
    ("nvfp4", "hf-modelopt", 264, "algo", "intermediate_size=264 (an input width of its linears) is not a multiple "
                                          "of 16 (NVFP4 scales blocks of 16 inputs)"),
    ("w4a16", "hf-compressed-tensors", 260, "algo", "is not a multiple of 8 (pack-quantized packs 8 codes along the"),
    ("w8a16", "hf-compressed-tensors", 262, "algo", "is not a multiple of 4 (pack-quantized packs 4 codes"),
    ("w4a16_awq", "hf-modelopt", 288, "group_size", "intermediate_size=288 (an input width of its linears) is not a "
                                                    "multiple of 64 (group_size=64 groups the inputs)"),
])
def test_input_widths_the_format_cannot_pack_are_refused_at_plan_time(quant_model, calib_file, tmp_path, capsys,
                                                                      algo, target, intermediate, field, message):
    model = tmp_path / "model"
    shutil.copytree(quant_model, model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = intermediate
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "plan", str(write_recipe(tmp_path, model, calib_file, algo=algo,
                                                            targets=f"[{target}]")))
    assert code == 2 and f"quantization.{field}: output target {target} with algo {algo}: the model's " in err, err
    assert message in err, err
