"""The engine stage: argv mapping, the FAKE trtllm-build contract, engine cache keys, failures."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from recipe_runner.trtllm.engine_options import ENGINE_FIELD_OPTIONS, build_options, engine_argv, option_releases
from recipe_runner.trtllm.releases import releases
from tests.fake_trtllm import install_fake_toolchain
from tests.fake_trtllm.trtllm_build import parser as fake_parser
from tests.recipe_files import MINIMAL, run_cli, write

ALL_FIELDS = {
    "max_batch_size": 16, "max_input_len": 2048, "max_seq_len": 4096, "max_num_tokens": 4096,
    "opt_num_tokens": 1024, "max_beam_width": 2, "max_prompt_embedding_table_size": 0,
    "kv_cache_type": "paged", "gemm_plugin": "float16", "gpt_attention_plugin": "auto",
    "context_fmha": True, "use_paged_context_fmha": False, "use_fp8_context_fmha": False,
    "remove_input_padding": True, "use_fused_mlp": False, "tokens_per_block": 64,
    "multiple_profiles": True, "reduce_fusion": False, "logits_dtype": "float32",
    "gather_context_logits": True, "gather_generation_logits": False, "strongly_typed": True,
    "workers": 2, "log_level": "warning",
    "extra_args": {"weight_sparsity": True, "fast_build": False, "profiling_verbosity": "detailed",
                   "max_draft_len": 4},
}
GOLDEN_ARGV_DIR = Path(__file__).parent / "golden" / "argv"
GOLDEN_ARGV = [
    "--checkpoint_dir", "/ck", "--output_dir", "/out", "--output_timing_cache", "/out/timing.cache",
    "--max_batch_size", "16", "--max_input_len", "2048", "--max_seq_len", "4096", "--max_num_tokens", "4096",
    "--opt_num_tokens", "1024", "--max_beam_width", "2", "--max_prompt_embedding_table_size", "0",
    "--kv_cache_type", "paged", "--gemm_plugin", "float16", "--gpt_attention_plugin", "auto",
    "--context_fmha", "enable", "--use_paged_context_fmha", "disable", "--use_fp8_context_fmha", "disable",
    "--remove_input_padding", "enable", "--use_fused_mlp", "disable", "--tokens_per_block", "64",
    "--multiple_profiles", "enable", "--reduce_fusion", "disable", "--logits_dtype", "float32",
    "--gather_context_logits", "--workers", "2", "--log_level", "warning",
    "--max_draft_len", "4", "--profiling_verbosity", "detailed", "--weight_sparsity",
]


def test_every_engine_field_maps_to_a_recorded_option():
    options = build_options()
    assert set(ENGINE_FIELD_OPTIONS) | {"strongly_typed", "extra_args"} == set(ALL_FIELDS)
    assert all(name in options for name in ENGINE_FIELD_OPTIONS.values())


def test_golden_argv_for_every_engine_field(monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_RELEASE", "0.14")
    argv = engine_argv(ALL_FIELDS, "/ck", "/out", "0.14")
    assert argv == GOLDEN_ARGV
    parsed = fake_parser().parse_args(argv)  # the recorded option list accepts every word
    assert parsed.tokens_per_block == 64 and parsed.weight_sparsity is True and parsed.fast_build is False


@pytest.mark.parametrize("release", list(releases()))
def test_argv_per_release_matches_its_golden_file_and_that_release_parses_it(release, monkeypatch):
    """tests/golden/argv/<release>.json (RECIPE_RECORD_GOLDEN=1 re-records); the FAKE trtllm-build of
    that release (its recorded argparse options) accepts every word."""
    argv = engine_argv(ALL_FIELDS, "/ck", "/out", release)
    golden = GOLDEN_ARGV_DIR / f"{release}.json"
    if os.environ.get("RECIPE_RECORD_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(golden.read_text())
    monkeypatch.setenv("FAKE_TRTLLM_RELEASE", release)
    parsed = fake_parser().parse_args(argv)
    assert parsed.max_seq_len == 4096 and parsed.tokens_per_block == 64


def test_a_flag_one_release_lacks_is_refused_for_that_release_only(monkeypatch):
    """--monitor_memory first appears in 0.15 (recorded options); 0.14's parser refuses it too."""
    assert option_releases("monitor_memory") == ["0.15", "0.16"]
    engine = {"max_seq_len": 8, "extra_args": {"monitor_memory": True}}
    assert "--monitor_memory" in engine_argv(engine, "/ck", "/out", "0.15")
    monkeypatch.setenv("FAKE_TRTLLM_RELEASE", "0.14")
    with pytest.raises(SystemExit):
        fake_parser().parse_args(["--monitor_memory"])
    with pytest.raises(KeyError):
        engine_argv(engine, "/ck", "/out", "0.14")  # plan time refuses it first (checks/release.py)


def test_old_releases_get_paged_kv_cache_switch():
    argv = engine_argv({"kv_cache_type": "continuous", "max_seq_len": 8}, "/ck", "/out", "0.12")
    assert argv[argv.index("--paged_kv_cache") + 1] == "disable" and "--kv_cache_type" not in argv
    assert "--kv_cache_type" in engine_argv({"kv_cache_type": "continuous"}, "/ck", "/out", "0.13")


@pytest.mark.parametrize("extra, message", [
    ("max_draft_len: four", "engine.extra_args.max_draft_len: --max_draft_len takes an integer, not 'four'"),
    ("weight_sparsity: 'yes'", "engine.extra_args.weight_sparsity: --weight_sparsity is a switch: use true or false"),
    ("kv_cache_type: paged", "engine.extra_args.kv_cache_type: --kv_cache_type has its own recipe field"),
    ("checkpoint_dir: /x", "engine.extra_args.checkpoint_dir: --checkpoint_dir is set by recipe-runner"),
])
def test_invalid_engine_options_are_located(tmp_path, capsys, extra, message):
    path = write(tmp_path, "r.yaml", MINIMAL + f"engine:\n  max_seq_len: 64\n  extra_args:\n    {extra}\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert f"r.yaml:8:5: {message}" in err


def test_invalid_engine_field_type_is_located(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", MINIMAL + "engine:\n  max_seq_len: 64\n  gemm_plugin: int8\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and "r.yaml:7:16: engine.gemm_plugin: 'int8' is not one of" in err


@pytest.fixture
def engine_recipe(tiny_model, tmp_path) -> Path:
    return write(tmp_path, "r.yaml", f"recipe_version: 1\nname: tiny\nsource: {{path: {tiny_model('gqa')}}}\n"
                                     "mapping: {tp_size: 2}\noutput: {dir: out}\n"
                                     "engine:\n  max_batch_size: 8\n  max_seq_len: 256\n  max_input_len: 128\n")


def _build(capsys, recipe: Path, cache: Path, *args: str):
    return run_cli(capsys, "build", str(recipe), "--cache-dir", str(cache), *args)


def _stage_lines(out: str) -> dict[str, str]:
    return {line.split("]")[0][1:]: line.split("] ")[1].split(" ")[0] for line in out.splitlines()
            if line.startswith("[") and ("running" in line or "cached" in line)}


def test_engine_build_with_the_fake_and_its_cache_key(engine_recipe, tmp_path, monkeypatch, capsys):
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    cache = tmp_path / "cache"
    code, out, err = _build(capsys, engine_recipe, cache)
    assert code == 0, err
    assert "using trtllm-build from TensorRT-LLM 0.14.0" in out and str(tmp_path / "fake" / "bin") in out
    assert _stage_lines(out) == {"convert": "running", "shard": "running", "build-engine": "running"}
    engine_dir = tmp_path / "out" / "engine"
    marker = json.loads((engine_dir / "rank1.engine").read_text().split(" ", 1)[1])
    assert marker["fake"] is True and marker["argv"][:2] == ["--checkpoint_dir", marker["argv"][1]]
    assert "--max_batch_size" in marker["argv"] and (engine_dir / "build.log").is_file()
    lock = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert lock["tools"]["tensorrt_llm"] == "0.14.0" and lock["tools"]["gpus"] == "NVIDIA H100 80GB HBM3|9.0"
    assert "engine/rank0.engine" in lock["outputs"] and "checkpoint/rank0.safetensors" in lock["outputs"]

    code, out, _ = _build(capsys, engine_recipe, cache)
    assert _stage_lines(out) == {"convert": "cached", "shard": "cached", "build-engine": "cached"}

    install_fake_toolchain(tmp_path / "fake-a100", monkeypatch, gpu="NVIDIA A100-SXM4-80GB", compute_cap="8.0")
    code, out, _ = _build(capsys, engine_recipe, cache)
    assert _stage_lines(out) == {"convert": "cached", "shard": "cached", "build-engine": "running"}
    assert "tool gpus: [\"NVIDIA H100 80GB HBM3|9.0\"] -> [\"NVIDIA A100-SXM4-80GB|8.0\"]" in out

    install_fake_toolchain(tmp_path / "fake-015", monkeypatch, version="0.15.0", gpu="NVIDIA A100-SXM4-80GB",
                           compute_cap="8.0")
    code, out, _ = _build(capsys, engine_recipe, cache)
    assert _stage_lines(out)["build-engine"] == "running" and "tool tensorrt_llm: 0.14.0 -> 0.15.0" in out


def test_only_engine_fields_rerun_only_the_engine(engine_recipe, tmp_path, monkeypatch, capsys):
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    cache = tmp_path / "cache"
    assert _build(capsys, engine_recipe, cache)[0] == 0
    engine_recipe.write_text(engine_recipe.read_text().replace("max_batch_size: 8", "max_batch_size: 16"))
    code, out, _ = _build(capsys, engine_recipe, cache)
    assert _stage_lines(out) == {"convert": "cached", "shard": "cached", "build-engine": "running"}
    assert "recipe max_batch_size: 8 -> 16" in out


def test_failed_engine_build_reports_log_tail_and_caches_nothing(engine_recipe, tmp_path, monkeypatch, capsys):
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "1")
    cache = tmp_path / "cache"
    code, out, err = _build(capsys, engine_recipe, cache)
    assert code == 1
    assert "trtllm-build failed with exit code 1; last lines of its log:" in err
    assert "FAKE failure: out of GPU memory while building rank 0" in err
    logs = list((cache / "logs").glob("build-engine-*.log"))
    assert len(logs) == 1 and f"full log: {logs[0]}" in err and "FAKE failure" in logs[0].read_text()
    stages = [json.loads(m.read_text())["stage"] for m in (cache / "entries").glob("*/*/manifest.json")]
    assert sorted(stages) == ["convert", "shard"]
    assert not list((cache / "tmp").glob("*")) and not (tmp_path / "out" / "recipe.lock").exists()


def test_without_trtllm_build_the_build_fails_before_any_stage(engine_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no trtllm-build, no nvidia-smi
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt_llm" else real_find_spec(name, *a))
    cache = tmp_path / "cache"
    code, out, err = _build(capsys, engine_recipe, cache)
    assert code == 2
    assert "trtllm-build is not on PATH" in err and "pip install tensorrt-llm" in err and "--until checkpoint" in err
    assert not (cache / "entries").exists()
    code, out, _ = run_cli(capsys, "plan", str(engine_recipe), "--cache-dir", str(cache))
    assert code == 0 and "missing: trtllm-build is not available here" in out
    code, out, err = _build(capsys, engine_recipe, cache, "--until", "checkpoint")
    assert code == 0, err
    assert (tmp_path / "out" / "checkpoint" / "rank1.safetensors").is_file()


def test_trtllm_build_without_gpu_is_refused(engine_recipe, tmp_path, monkeypatch, capsys):
    bin_dir = install_fake_toolchain(tmp_path / "fake", monkeypatch)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    code, _, err = _build(capsys, engine_recipe, tmp_path / "cache")
    assert code == 2 and "no NVIDIA GPU is visible" in err


def test_the_fake_is_not_part_of_the_package():
    import recipe_runner

    package = Path(recipe_runner.__file__).parent
    assert not list(package.rglob("*fake*"))
    assert "fake" not in Path(recipe_runner.__file__).read_text().lower()


def test_engine_waits_for_verify_and_is_not_built_when_it_fails(tiny_model, tmp_path, monkeypatch, capsys):
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    recipe = write(tmp_path, "r.yaml", f"recipe_version: 1\nname: tiny\nsource: {{path: {tiny_model('gqa')}}}\n"
                                       "output: {dir: out}\nengine: {max_seq_len: 256, max_input_len: 128}\n"
                                       "verify:\n  token_ids: [[1, 2, 3, 4]]\n  tolerances: {max_abs_logit_error: 1.0e-12}\n")
    code, out, err = _build(capsys, recipe, tmp_path / "cache")
    assert code == 1
    assert "max_abs_logit_error" in err
    assert "[build-engine] running" not in out and not (tmp_path / "cache" / "logs").exists()
    recipe.write_text(recipe.read_text().replace("1.0e-12", "1.0"))
    code, out, err = _build(capsys, recipe, tmp_path / "cache")
    assert code == 0, err
    assert out.index("[verify] running") < out.index("[build-engine] running")
    assert (tmp_path / "out" / "engine" / "rank0.engine").is_file() and (tmp_path / "out" / "verify" / "verify.json").is_file()
