"""`recipe verify` on the quantized Hugging Face checkpoints the export stages write (hf-modelopt,
hf-compressed-tensors): every written (algo, target) pair within its default tolerance, corrupted
exports failing with the figure that shows it, and a build with HF targets publishing its report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from recipe_runner.pipeline.build import run_build
from recipe_runner.store.cache import CacheStore
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from recipe_runner.verify.run import verify_checkpoint
from tests.recipe_files import run_cli
from tests.test_hf_export_build import write_recipe

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Explain tensor parallelism in one sentence:"]
PAIRS = [("hf-modelopt", "fp8", "none"), ("hf-modelopt", "fp8", "fp8"), ("hf-modelopt", "w8a16", "none"),
         ("hf-modelopt", "w4a16_awq", "none"), ("hf-modelopt", "w4a16_awq", "fp8"), ("hf-modelopt", "nvfp4", "none"),
         ("hf-modelopt", "nvfp4", "fp8"), ("hf-compressed-tensors", "w8a16", "none"),
         ("hf-compressed-tensors", "w4a16", "none"), ("hf-compressed-tensors", "w4a16_awq", "fp8"),
         ("hf-compressed-tensors", "nvfp4", "none"), ("hf-compressed-tensors", "nvfp4", "fp8"),
         ("hf-compressed-tensors", "w8a8_sq_per_channel", "none"),
         ("hf-compressed-tensors", "w8a8_sq_per_channel_per_token", "fp8")]
ALGO = {"fp8": "FP8", "w8a16": "W8A16", "w4a16": "W4A16", "w4a16_awq": "W4A16_AWQ", "nvfp4": "NVFP4",
        "w8a8_sq_per_channel": "W8A8_SQ_PER_CHANNEL", "w8a8_sq_per_channel_per_token": "W8A8_SQ_PER_CHANNEL_PER_TOKEN"}


@pytest.fixture
def exported(hf_exported):
    return hf_exported


@pytest.mark.parametrize("target, algo, kv", PAIRS)
def test_every_written_pair_passes_its_default_tolerance(exported, quant_model, tmp_path, capsys, target, algo, kv):
    out = exported(target, algo, kv)
    code, stdout, err = run_cli(capsys, "verify", str(out), "--source", str(quant_model), *sum(
        (["--prompt", p] for p in PROMPTS), []), "--report-dir", str(tmp_path / "rep"))
    report = json.loads((tmp_path / "rep" / "verify.json").read_text())
    print(target, algo, kv, report["figures"])
    assert code == 0, stdout + err
    assert report["checkpoint"]["format"] == target and report["checkpoint"]["quant_algo"] == ALGO[algo]
    assert report["checkpoint"]["kv_cache_quant_algo"] == ("FP8" if kv == "fp8" else None)
    assert report["figures"]["mean_abs_logit_error"] > 1e-4  # the quantization was simulated


def _damaged(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _failures(ckpt: Path, model: Path) -> dict[str, float]:
    result = verify_checkpoint(ckpt, model, prompts=PROMPTS)
    return {f.figure: f.value for f in result.failures}


@pytest.mark.parametrize("target, algo", [("hf-modelopt", "nvfp4"), ("hf-compressed-tensors", "w4a16"),
                                          ("hf-modelopt", "fp8")])
def test_gate_and_up_codes_swapped_fail_verify(exported, quant_model, tmp_path, target, algo):
    def swap(t):
        for layer in range(4):
            for suffix in [s.split("gate_proj.")[1] for s in t if s.startswith(f"model.layers.{layer}.mlp.gate_proj.")]:
                g, u = f"model.layers.{layer}.mlp.gate_proj.{suffix}", f"model.layers.{layer}.mlp.up_proj.{suffix}"
                t[g], t[u] = t[u], t[g]
    failures = _failures(_damaged(exported(target, algo, "none"), tmp_path / "bad", swap), quant_model)
    # the quantized KL limits are set from a trained model (tolerances.py); on this tiny model's flat
    # distributions the swap shows as lost top-1 agreement (0.08 for NVFP4, floor 0.15)
    assert {"mean_kl", "top1_agreement"} & failures.keys(), failures


def test_wrong_nvfp4_global_scale_fails(exported, quant_model, tmp_path):
    def scale(t):
        for name in [n for n in t if n.endswith(".weight_global_scale")]:
            t[name] = t[name] / 8  # every weight 8x too large
    failures = _failures(_damaged(exported("hf-compressed-tensors", "nvfp4", "none"), tmp_path / "bad", scale),
                         quant_model)
    assert failures["top1_agreement"] == 0.0 and failures["max_layer_error"] > 10, failures


def test_missing_scale_names_the_tensor(exported, quant_model, tmp_path, capsys):
    bad = _damaged(exported("hf-modelopt", "fp8", "none"), tmp_path / "bad",
                   lambda t: t.pop("model.layers.2.mlp.up_proj.input_scale"))
    code, _, err = run_cli(capsys, "verify", str(bad), "--source", str(quant_model), "--prompt", PROMPTS[0])
    assert code == 1 and "model.layers.2.mlp.up_proj.input_scale' is missing" in err, err


def test_build_with_hf_targets_verifies_each_and_publishes_the_reports(quant_model, calib_file, tmp_path):
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo="nvfp4", kv="fp8",
                          targets="[hf-modelopt, hf-compressed-tensors]")
    recipe.write_text(recipe.read_text() + "verify:\n  prompts: " + json.dumps(PROMPTS) + "\n")
    plan = make_plan(load_recipe(recipe))
    assert plan.stage("verify").inputs == ("export-hf-modelopt", "export-hf-compressed-tensors", "source", "tokenizer")
    result = run_build(plan, store=CacheStore(tmp_path / "cache"), echo=lambda _: None)
    assert [t["stage"] for t in result.trace][-1] == "verify"
    first = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    second = json.loads((result.output_dir / "verify" / "hf-compressed-tensors" / "verify.json").read_text())
    assert first["passed"] and second["passed"]
    assert first["checkpoint"]["format"] == "hf-modelopt" and second["checkpoint"]["format"] == "hf-compressed-tensors"
    assert first["tolerance_sources"]["mean_kl"] == "default for NVFP4 + FP8 KV cache"
    assert (result.output_dir / "verify" / "verify.md").is_file()
