"""Checkpoints and engine arguments for the TensorRT-LLM release a recipe targets (trtllm/releases.py).

config.json is checked the way each recorded release loads it (QuantConfig(**d) and Mapping(**d)
raise TypeError on a key their class lacks: tests/fake_trtllm/trtllm_build.load_problem reads the
recorded field sets), and recipes that need what a release lacks are refused with their location.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from recipe_runner.hf.config import ModelConfig
from recipe_runner.quant.algorithms import ALGORITHMS, KV_CACHES
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.trtllm import releases as rel
from recipe_runner.trtllm.config import build_checkpoint_config
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.quant import quantization_section
from tests.fake_trtllm import install_fake_toolchain
from tests.fake_trtllm.trtllm_build import load_problem
from tests.recipe_files import MINIMAL, run_cli, write

DATA = Path(rel.__file__).parents[1] / "data" / "trtllm"
MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
CHECKPOINT_ALGOS = [name for name, a in ALGORITHMS.items() if a.trtllm_checkpoint]


def _facts(release: str) -> dict:
    return json.loads((DATA / f"{release}.json").read_text())


def _config(algo: str, kv: str, release: str | None, tp: int = 2, pp: int = 1) -> dict:
    section = quantization_section(QuantSettings(algo, kv, 64, 0.5, ("lm_head",)))
    return build_checkpoint_config(MODEL, dtype="float16", mapping=ParallelMapping(tp, pp), quantization=section,
                                   release=rel.release_named(release))


def test_use_meta_recipe_is_written_only_for_the_releases_that_have_it():
    """The regression: 0.12-0.14's QuantConfig(**d) raised on `use_meta_recipe` (added in 0.15)."""
    for release in ("0.12", "0.13", "0.14"):
        config = _config("fp8", "fp8", release)
        assert "use_meta_recipe" not in config["quantization"]
        assert load_problem(config, _facts(release)) is None
        newer = _config("fp8", "fp8", "0.15")
        assert newer["quantization"]["use_meta_recipe"] is False
        assert load_problem(newer, _facts(release)) == \
            "QuantConfig.__init__() got an unexpected keyword argument 'use_meta_recipe'"


@pytest.mark.parametrize("release", list(rel.releases()))
def test_every_checkpoint_shape_loads_in_every_recorded_release(release):
    """fp16 tp/pp, every algo the rank files take, every KV cache: config.json's quantization section
    holds exactly that release's QuantConfig fields, in its order, and its Mapping accepts the mapping."""
    fields = [f["name"] for f in _facts(release)["quant_config"]["fields"]]
    for algo in CHECKPOINT_ALGOS:
        for kv in KV_CACHES:
            if kv not in ALGORITHMS[algo].kv_caches:
                continue
            for tp, pp in ((1, 1), (2, 1), (2, 2)):
                config = _config(algo, kv, release, tp, pp)
                assert list(config["quantization"]) == fields, (algo, kv)
                assert load_problem(config, _facts(release)) is None, (release, algo, kv)
                assert config["quantization"]["quant_algo"] == ALGORITHMS[algo].trtllm_quant_algo


def test_unknown_or_unrecorded_release_is_a_located_error(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", MINIMAL + 'tensorrt_llm: "0.11"\n')
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and "r.yaml:5:15: tensorrt_llm: '0.11' is not a recorded TensorRT-LLM release " \
                         "(recorded: 0.12, 0.13, 0.14, 0.15, 0.16)" in err


def test_a_flag_the_target_release_lacks_is_refused_with_its_location(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", MINIMAL + 'tensorrt_llm: "0.14"\nengine:\n  max_seq_len: 4096\n'
                 "  extra_args:\n    monitor_memory: true\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert ("r.yaml:9:5: engine.extra_args.monitor_memory: trtllm-build of TensorRT-LLM 0.14 has no option "
            "--monitor_memory (releases that have it: 0.15, 0.16)") in err
    path.write_text(path.read_text().replace('"0.14"', '"0.15"'))
    assert run_cli(capsys, "validate", str(path))[0] == 0


def test_kv_cache_type_disabled_needs_a_release_with_kv_cache_type(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", MINIMAL + 'tensorrt_llm: "0.12"\nengine:\n  max_seq_len: 4096\n'
                 "  kv_cache_type: disabled\n  use_paged_context_fmha: false\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and "r.yaml:8:18: engine.kv_cache_type: kv_cache_type disabled needs trtllm-build's " \
                         "--kv_cache_type, which TensorRT-LLM 0.12 lacks (releases that have it: 0.13, 0.14, " \
                         "0.15, 0.16)" in err


def test_an_algorithm_the_target_release_lacks_is_refused_with_its_location(tmp_path, capsys, monkeypatch):
    """Every recorded release has every QuantAlgo the rank files use, so the mechanism is shown on the real
    0.12 facts minus FP8 (as a release before FP8 would be)."""
    recorded = dict(rel.releases())
    recorded["0.12"] = dataclasses.replace(recorded["0.12"], quant_algos=recorded["0.12"].quant_algos - {"FP8"})
    monkeypatch.setattr(rel, "releases", lambda: recorded)
    monkeypatch.setattr("recipe_runner.checks.release.releases", lambda: recorded)
    calib = write(tmp_path, "calib.txt", "hello\n")
    path = write(tmp_path, "r.yaml", MINIMAL + 'tensorrt_llm: "0.12"\nquantization:\n  algo: fp8\n'
                 f"  calibration:\n    dataset: {calib}\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and "r.yaml:7:9: quantization.algo: algo fp8 writes QuantAlgo FP8, which TensorRT-LLM 0.12 " \
                         "does not have (releases that have it: 0.13, 0.14, 0.15, 0.16)" in err


@pytest.fixture
def engine_recipe(tiny_model, tmp_path) -> Path:
    return write(tmp_path, "r.yaml", f"recipe_version: 1\nname: tiny\nsource: {{path: {tiny_model('gqa')}}}\n"
                                     "mapping: {tp_size: 2}\noutput: {dir: out}\n"
                                     "engine:\n  max_batch_size: 8\n  max_seq_len: 256\n  max_input_len: 128\n")


def _build(capsys, recipe: Path, tmp_path: Path):
    return run_cli(capsys, "build", str(recipe), "--cache-dir", str(tmp_path / "cache"))


@pytest.mark.parametrize("version, meta", [("0.14.0", False), ("0.15.0", True)])
def test_unset_target_takes_the_installed_release(engine_recipe, tmp_path, monkeypatch, capsys, version, meta):
    """The fake trtllm-build of each release loads the checkpoint as that release would (it fails on a
    key its QuantConfig lacks), so a 0.14 build passing shows the checkpoint is 0.14's."""
    install_fake_toolchain(tmp_path / "fake", monkeypatch, version=version)
    code, _, err = _build(capsys, engine_recipe, tmp_path)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert ("use_meta_recipe" in config["quantization"]) is meta
    lock = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert lock["tools"]["tensorrt_llm"] == version


def test_a_target_other_than_the_installed_release_is_refused(engine_recipe, tmp_path, monkeypatch, capsys):
    engine_recipe.write_text(engine_recipe.read_text() + 'tensorrt_llm: "0.16"\n')
    install_fake_toolchain(tmp_path / "fake", monkeypatch, version="0.14.0")
    code, _, err = _build(capsys, engine_recipe, tmp_path)
    assert code == 2 and ("r.yaml:10:15: tensorrt_llm: the recipe targets TensorRT-LLM 0.16, but the installed "
                          "trtllm-build is TensorRT-LLM 0.14.0") in err
    assert not (tmp_path / "out").exists()


def test_an_unrecorded_installed_release_is_refused(engine_recipe, tmp_path, monkeypatch, capsys):
    install_fake_toolchain(tmp_path / "fake", monkeypatch, version="1.0.0")
    code, _, err = _build(capsys, engine_recipe, tmp_path)
    assert code == 2 and "the installed trtllm-build is TensorRT-LLM 1.0.0, a release recipe-runner has no " \
                         "recorded facts for (recorded: 0.12, 0.13, 0.14, 0.15, 0.16)" in err


def test_the_release_enters_the_shard_and_engine_keys(tmp_path):
    from recipe_runner.pipeline.plan import recipe_stages
    from recipe_runner.recipe import load_recipe

    path = write(tmp_path, "r.yaml", MINIMAL + "engine:\n  max_seq_len: 4096\n")
    params = {s.name: dict(s.params) for s in recipe_stages(load_recipe(path))}
    assert params["shard"]["tensorrt_llm"] == params["build-engine"]["tensorrt_llm"] == rel.newest().name
    path.write_text(path.read_text() + 'tensorrt_llm: "0.13"\n')
    params = {s.name: dict(s.params) for s in recipe_stages(load_recipe(path))}
    assert params["shard"]["tensorrt_llm"] == "0.13" and "tensorrt_llm" not in params["convert"]


def test_an_engine_value_the_release_does_not_list_is_refused(tmp_path, capsys):
    """The schema accepts log_level trace (newer trtllm-build lists it); no recorded release does."""
    path = write(tmp_path, "r.yaml", MINIMAL + "engine:\n  max_seq_len: 4096\n  log_level: trace\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and ("r.yaml:7:14: engine.log_level: TensorRT-LLM 0.16: --log_level must be one of "
                          "['internal_error', 'error', 'warning', 'info', 'verbose', 'debug'], not 'trace'") in err
    path.write_text(path.read_text().replace("trace", "debug"))
    assert run_cli(capsys, "validate", str(path))[0] == 0
