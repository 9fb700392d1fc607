"""Source models: local directories and hub ids resolved only from the local HF cache."""
from __future__ import annotations

import json

from recipe_runner.recipe import load_recipe
from recipe_runner.hf.sources import locate_source
from tests.recipe_files import run_cli, write

SHA = "0123456789abcdef0123456789abcdef01234567"
HUB_RECIPE = f"""\
recipe_version: 1
name: hub
source:
  hub_id: acme/tiny-llama
  revision: {SHA}
"""


def test_hub_source_not_cached_is_reported_not_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write(tmp_path, "r.yaml", HUB_RECIPE)
    source = locate_source(load_recipe(path))
    assert source.directory is None
    assert source.description == f"acme/tiny-llama@{SHA}"  # in full: a typo in the last digit shows
    assert source.missing_reason == (
        f"not in the local Hugging Face cache {tmp_path / 'empty-cache'} ($HF_HUB_CACHE): no "
        f"models--acme--tiny-llama there; fetch it once with `hf download acme/tiny-llama --revision {SHA}`")
    code, out, _ = run_cli(capsys, "plan", str(path))
    assert code == 0 and f"acme/tiny-llama@{SHA}  [not available: not in the local Hugging Face cache" in out


def test_hub_source_found_in_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source = locate_source(load_recipe(write(tmp_path, "r.yaml", HUB_RECIPE)))
    assert source.directory == snapshot


def test_remote_code_is_refused_unless_the_recipe_allows_it(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "auto_map": {"AutoModel": "modeling_x.X"}}))
    path = write(tmp_path, "r.yaml", "recipe_version: 1\nname: x\nsource:\n  path: model\n")
    code, _, err = run_cli(capsys, "plan", str(path))
    assert code == 2
    assert "r.yaml:4:3: source.trust_remote_code:" in err and "asks for custom code (auto_map: ['AutoModel'])" in err


def test_hub_source_at_another_revision_names_both_in_full(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    held = SHA[:-1] + "8"  # the cache holds a commit one digit away from the recipe's
    (home / "hub" / "models--acme--tiny-llama" / "snapshots" / held).mkdir(parents=True)
    source = locate_source(load_recipe(write(tmp_path, "r.yaml", HUB_RECIPE)))
    assert source.directory is None
    assert source.missing_reason == (
        f"not in the local Hugging Face cache {home / 'hub'} ($HF_HOME/hub): models--acme--tiny-llama has no "
        f"snapshot {SHA} (it holds {held}); fetch it once with `hf download acme/tiny-llama --revision {SHA}`")


CALIBRATED = """\
recipe_version: 1
name: q
source:
  path: model
quantization:
  algo: fp8
  calibration:
    dataset: {dataset}
    revision: {revision}
"""


def test_calibration_revision_is_checked_like_source_revision(tmp_path, capsys):
    path = write(tmp_path, "q.yaml", CALIBRATED.format(dataset="acme/calib", revision="main"))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert ("q.yaml:9:15: quantization.calibration.revision: 'main' is not a commit sha; pin the 40-hex commit of "
            "the dataset (see the dataset page's 'Files and versions' history; branch names are not reproducible)"
            in err)
    path = write(tmp_path, "q.yaml", CALIBRATED.format(dataset="calib.jsonl", revision="a" * 40))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and ("quantization.calibration.revision: applies only to a dataset id in the local Hugging "
                          "Face cache, and dataset 'calib.jsonl' is a local file; remove revision") in err
    path = write(tmp_path, "q.yaml", CALIBRATED.format(dataset="acme/calib", revision="a" * 40))
    assert run_cli(capsys, "validate", str(path))[0] == 0
    assert load_recipe(path).get("quantization.calibration.revision") == "a" * 40
