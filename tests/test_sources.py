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
    assert "not in the local Hugging Face cache" in source.missing_reason
    assert f"huggingface-cli download acme/tiny-llama --revision {SHA}" in source.missing_reason
    code, out, _ = run_cli(capsys, "plan", str(path))
    assert code == 0 and "acme/tiny-llama@0123456789ab  [not available: not in the local Hugging Face cache" in out


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
