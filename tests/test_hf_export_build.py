"""Recipes with HF output targets: one calibration shared by every target, published folders, and the
combinations no consumer loads refused at the recipe line."""
from __future__ import annotations

from pathlib import Path

import pytest

from recipe_runner.pipeline.build import run_build
from recipe_runner.store.cache import CacheStore
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from tests.recipe_files import run_cli

RECIPE = """recipe_version: 1
name: hf
source:
  path: {model}
quantization:
  algo: {algo}
  kv_cache: {kv}
  group_size: 64
  calibration: {{dataset: {dataset}, num_samples: 6, max_seq_len: 16, batch_size: 2}}
output:
  dir: {out}
  targets: {targets}
"""


def write_recipe(tmp_path: Path, model, dataset, *, algo="w4a16_awq", kv="none", targets="[trtllm-checkpoint]"):
    path = tmp_path / "hf.yaml"
    path.write_text(RECIPE.format(model=model, algo=algo, kv=kv, dataset=dataset, out=tmp_path / "out",
                                  targets=targets))
    return path


def test_two_hf_targets_and_the_trtllm_checkpoint_share_one_calibration(quant_model, calib_file, tmp_path):
    recipe = write_recipe(tmp_path, quant_model, calib_file,
                          targets="[trtllm-checkpoint, hf-modelopt, hf-compressed-tensors]")
    plan = make_plan(load_recipe(recipe))
    assert plan.stage("export-hf-modelopt").inputs == ("convert", "calibrate", "source")
    result = run_build(plan, store=CacheStore(tmp_path / "cache"), echo=lambda _: None)
    stages = [t["stage"] for t in result.trace]
    assert stages.count("calibrate") == 1
    assert {"quantize", "shard", "export-hf-modelopt", "export-hf-compressed-tensors"} <= set(stages)
    for folder in ("checkpoint", "hf-modelopt", "hf-compressed-tensors"):
        assert (result.output_dir / folder / "config.json").is_file()
    assert (result.output_dir / "hf-modelopt" / "hf_quant_config.json").is_file()


def test_hf_only_recipe_needs_no_shard(quant_model, calib_file, tmp_path):
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo="nvfp4", targets="[hf-modelopt]")
    names = [s.name for s in make_plan(load_recipe(recipe)).stages]
    assert names == ["convert", "calibrate", "export-hf-modelopt"]


@pytest.mark.parametrize("algo, kv, targets, message", [
    ("w8a8_sq_per_channel", "none", "[hf-modelopt]",
     "hf.yaml:6:9: quantization.algo: output target hf-modelopt with algo w8a8_sq_per_channel: TensorRT-LLM's "
     "PyTorch backend rejects SmoothQuant"),
    ("w8a8_sq_per_tensor", "none", "[hf-modelopt]", "use target hf-compressed-tensors"),
    ("w8a8_sq_per_channel_per_token", "fp8", "[hf-modelopt]", "vLLM's modelopt loader accepts only FP8/NVFP4"),
    ("none", "none", "[hf-compressed-tensors]", "nothing to quantize"),
    ("w8a8_sq_per_tensor", "none", "[hf-compressed-tensors]", "use w8a8_sq_per_channel"),
    ("w4a16", "none", "[hf-modelopt]", "use w4a16_awq (TensorRT-LLM)"),
    ("fp8", "none", "[hf-compressed-tensors]", "use output.targets: [hf-modelopt]"),
    ("none", "none", "[hf-modelopt]", "nothing to quantize"),
    ("none", "fp8", "[hf-compressed-tensors]", "target hf-modelopt for a KV-only checkpoint"),
    ("nvfp4", "none", "[trtllm-checkpoint]", "algo nvfp4 is written only as a Hugging Face checkpoint"),
    ("fp8", "int8", "[hf-modelopt]", "an INT8 KV cache has no scales in these formats"),
])
def test_combinations_no_consumer_loads_are_recipe_errors(quant_model, calib_file, tmp_path, capsys, algo, kv,
                                                          targets, message):
    code, _, err = run_cli(capsys, "plan", str(write_recipe(tmp_path, quant_model, calib_file, algo=algo, kv=kv,
                                                            targets=targets)))
    assert code == 2 and message in err, err
