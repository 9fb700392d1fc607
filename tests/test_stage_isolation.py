"""A stage reads nothing its key does not hash: its run function gets a StageJob (the key's params, one
path per key input) and nothing else, so it cannot reach a recipe field outside its key.

Enforced by running every stage of the shipped shapes again from a job made of its key's material
alone, with the recipe's directory moved away, the working directory elsewhere, and the source model and
calibration file copied to other paths: each stage must write exactly the bytes of its cache entry.
"""
from __future__ import annotations

import hashlib
import inspect
import shutil
from pathlib import Path
from types import MappingProxyType

import pytest

from recipe_runner.pipeline.execute import prepare
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.pipeline.scheduler import InlineExecutor, run_builds
from recipe_runner.recipe import load_recipe
from recipe_runner.stages.registry import STAGES, StageJob, stage_executor
from recipe_runner.store.cache import CacheStore
from tests.fake_trtllm import install_fake_toolchain
from tests.recipe_files import write
from tests.test_build_quantized import write_recipe as write_quantized_recipe
from tests.test_hf_export_build import write_recipe as write_hf_recipe
from tests.test_verify_build import write_recipe as write_verify_recipe

ENGINE_RECIPE = ("recipe_version: 1\nname: tiny-engine\nsource: {path: model}\nmapping: {tp_size: 2}\n"
                 "output: {dir: out}\nengine:\n  max_batch_size: 8\n  max_seq_len: 256\n  max_input_len: 128\n")
# trtllm-build's (fake) engine files record its argv, which names the checkpoint and output paths
PATH_NAMING_FILES = {"build-engine": {"rank0.engine", "rank1.engine"}}


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _job_from_key(status, store: CacheStore, moved: dict[str, Path], out_dir: Path, toolchain) -> StageJob:
    """The job rebuilt from the key material only: upstream inputs by their key digests."""
    material = status.key.material
    inputs = {name: moved[name] if name in moved else store.get(digest).path
              for name, digest in material["inputs"].items()}
    return StageJob(status.stage.name, StageJob.frozen_params(material["params"]), MappingProxyType(inputs),
                    MappingProxyType(dict(material["inputs"])), out_dir, 1,
                    toolchain if status.stage.name == "build-engine" else None)


def _rerun_every_stage_from_its_key(recipe_path: Path, tmp_path: Path, monkeypatch) -> set[str]:
    store = CacheStore(tmp_path / "cache")
    plan = make_plan(load_recipe(recipe_path))
    report = run_builds([plan], store=store, executor=InlineExecutor(lambda _: None), echo=lambda _: None)
    report.raise_first_failure()
    (resolved,) = prepare([plan], store, rehash=False, echo=lambda _: None)
    elsewhere = tmp_path / "elsewhere"
    moved = {"source": elsewhere / "model", "tokenizer": elsewhere / "model"}
    shutil.copytree(resolved.source_dir, moved["source"])
    if "calibration-data" in {i for s in resolved.statuses for i in s.stage.inputs}:
        calibration = plan.recipe.resolve_path("quantization.calibration.dataset")
        moved["calibration-data"] = elsewhere / "calibration" / calibration.name
        moved["calibration-data"].parent.mkdir(parents=True)
        shutil.copyfile(calibration, moved["calibration-data"])
    recipe_dir = recipe_path.parent
    recipe_dir.rename(recipe_dir.with_name(recipe_dir.name + "-moved-away"))  # the recipe is gone
    empty = tmp_path / "empty-cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    ran = set()
    for status in resolved.statuses:
        name = status.stage.name
        out_dir = tmp_path / "rerun" / name
        out_dir.mkdir(parents=True)
        stage_executor(name)(_job_from_key(status, store, moved, out_dir, resolved.toolchain))
        cached = {rel: meta["sha256"] for rel, meta in store.get(status.key.digest).files.items()}
        skip = PATH_NAMING_FILES.get(name, set())
        got = _digests(out_dir)
        assert set(got) == set(cached), name
        assert {r: d for r, d in got.items() if r not in skip} == {r: d for r, d in cached.items() if r not in skip}, \
            f"{name} wrote other bytes from its key's material alone"
        ran.add(name)
    assert not list(empty.iterdir()), "a stage wrote into the working directory"
    return ran


def _recipe_dir(tmp_path: Path, model: Path, calib_file: Path | None = None) -> Path:
    """The recipe's directory with copies of the model and calibration file, all moved away later."""
    d = tmp_path / "recipe"
    shutil.copytree(model, d / "model")
    if calib_file is not None:
        shutil.copyfile(calib_file, d / "calib.txt")
    return d


def test_every_run_function_takes_only_a_job():
    for name in STAGES:
        parameters = list(inspect.signature(stage_executor(name)).parameters)
        assert parameters == ["job"], (name, parameters)


def test_a_job_holds_exactly_the_key_params_read_only():
    params = StageJob.frozen_params({"tp_size": 2, "exclude_modules": ["lm_head"], "nested": {"a": 1}})
    assert params["exclude_modules"] == ("lm_head",) and params["nested"]["a"] == 1
    with pytest.raises(TypeError):
        params["tp_size"] = 4  # type: ignore[index]
    with pytest.raises(KeyError):
        params["pp_size"]


def test_unquantized_stages_with_verify_depend_only_on_their_keys(tiny_model, tmp_path, monkeypatch):
    d = _recipe_dir(tmp_path, tiny_model("gqa", with_tokenizer=True))
    recipe = write_verify_recipe(d, d / "model")
    assert _rerun_every_stage_from_its_key(recipe, tmp_path, monkeypatch) == {"convert", "shard", "verify"}


def test_calibrated_quantized_stages_depend_only_on_their_keys(quant_model, calib_file, tmp_path, monkeypatch):
    d = _recipe_dir(tmp_path, quant_model, calib_file)
    recipe = write_quantized_recipe(d, d / "model", "calib.txt", algo="fp8", kv="fp8")
    assert _rerun_every_stage_from_its_key(recipe, tmp_path, monkeypatch) == {
        "convert", "calibrate", "quantize", "shard"}


def test_hf_export_stages_depend_only_on_their_keys(quant_model, calib_file, tmp_path, monkeypatch):
    d = _recipe_dir(tmp_path, quant_model, calib_file)
    recipe = write_hf_recipe(d, d / "model", "calib.txt", algo="nvfp4", targets="[hf-modelopt, hf-compressed-tensors]")
    assert _rerun_every_stage_from_its_key(recipe, tmp_path, monkeypatch) == {
        "convert", "calibrate", "export-hf-modelopt", "export-hf-compressed-tensors"}


def test_the_engine_stage_depends_only_on_its_key(tiny_model, tmp_path, monkeypatch):
    d = _recipe_dir(tmp_path, tiny_model("gqa"))
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    recipe = write(d, "r.yaml", ENGINE_RECIPE)
    assert _rerun_every_stage_from_its_key(recipe, tmp_path, monkeypatch) == {"convert", "shard", "build-engine"}
