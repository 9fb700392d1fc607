"""Loading real recipes: extends, variables, normalization, canonical hashes, `show` output."""
from __future__ import annotations

import json

import pytest

from recipe_runner.errors import RecipeError
from recipe_runner.recipe import load_recipe
from tests.recipe_files import MINIMAL, REPO, run_cli, write

RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml"))
GOLDEN = REPO / "tests" / "golden"
# the order `recipe plan` lists stages in; verify runs before the engine: a checkpoint is proven on
# CPU before GPU hours go into it
STAGE_ORDER = ("convert", "calibrate", "quantize", "shard", "export-hf-modelopt", "export-hf-compressed-tensors",
               "verify", "build-engine")


def test_the_shipped_recipes_are_the_documented_ones():
    names = {p.as_posix() for p in RECIPES}
    for required in ("recipes/llama-70b-int8-tp4.yaml", "recipes/llama-3.1-8b-fp16-tp1.yaml",
                     "recipes/llama-3.1-8b-fp8-tp1.yaml", "recipes/llama-2-13b-sq-tp2.yaml",
                     "recipes/llama-3.1-70b-int4-awq-tp2-pp2.yaml", "recipes/llama-base.yaml",
                     "recipes/demo/tiny-llama.yaml", "recipes/llama-3.1-8b-fp8-tp1-hf.yaml",
                     "recipes/llama-3.1-70b-nvfp4-hf.yaml"):
        assert required in names


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_every_shipped_recipe_validates_and_plans(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, "validate", str(path))
    assert (code, err) == (0, ""), err
    assert out.startswith(f"OK   {path} (")
    code, out, err = run_cli(capsys, "plan", str(path), "--format", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["format"] == "recipe-runner/plan/1" and len(plan["recipes"]) == 1
    stages = [s["name"] for s in plan["recipes"][0]["stages"]]
    recipe = load_recipe(REPO / path)
    writes = recipe.data.get("output", {}).get("targets", ["trtllm-checkpoint"])
    assert stages[0] == "convert" and ("shard" in stages) == ("trtllm-checkpoint" in writes)
    assert all(f"export-{t}" in stages for t in writes if t.startswith("hf-"))
    assert stages == sorted(stages, key=STAGE_ORDER.index)


def test_headline_recipe_resolves_through_its_base(monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/llama-70b-int8-tp4.yaml")
    assert recipe.get("source.path") == "/models/Meta-Llama-3.1-70B-Instruct"
    assert recipe.get("mapping.tp_size") == 4 and recipe.get("mapping.pp_size") == 1
    assert recipe.get("quantization.algo") == "w8a16"
    assert recipe.get("engine.max_seq_len") == 16384
    assert recipe.get("engine.use_paged_context_fmha") is True  # from the base
    assert recipe.get("verify.prompts")[0] == "The capital of France is"  # from the base
    assert str(recipe.location("engine.use_paged_context_fmha")).startswith("recipes/llama-base.yaml:")
    assert str(recipe.location("engine.max_seq_len")) == "recipes/llama-70b-int8-tp4.yaml:26:16"
    assert [p.name for p in recipe.files] == ["llama-70b-int8-tp4.yaml", "llama-base.yaml"]
    assert "extends" not in recipe.data and "vars" not in recipe.data


def test_set_overrides_vars_with_yaml_types(tmp_path):
    path = write(tmp_path, "r.yaml", """\
        recipe_version: 1
        name: "tiny-{{ tp }}"
        vars: {tp: 2, root: /models}
        source: {path: "{{ root }}/m"}
        mapping: {tp_size: "{{ tp }}"}
        """)
    recipe = load_recipe(path)
    assert recipe.get("mapping.tp_size") == 2 and recipe.name == "tiny-2"
    recipe = load_recipe(path, {"tp": 4, "root": "/data"})
    assert recipe.get("mapping.tp_size") == 4 and recipe.get("source.path") == "/data/m"
    with pytest.raises(RecipeError, match="mapping.tp_size: 'four' is not of type 'integer'"):
        load_recipe(path, {"tp": "four"})


def test_recipe_data_is_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL))
    with pytest.raises(TypeError):
        recipe.data["mapping"]["tp_size"] = 8  # type: ignore[index]
    with pytest.raises(AttributeError):
        recipe.data["quantization"]["exclude_modules"].append("x")


def test_normalization_fills_defaults_and_relative_paths_follow_their_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "family/base.yaml", MINIMAL.replace("path: model", "path: ../models/llama"))
    path = write(tmp_path, "family/variants/v.yaml", "extends: ../base.yaml\nname: v\noutput: {dir: out}\n")
    recipe = load_recipe(path)
    assert recipe.get("mapping") == {"tp_size": 1, "pp_size": 1, "use_parallel_embedding": False,
                                     "embedding_sharding_dim": 0}
    assert recipe.get("quantization.exclude_modules") == ("lm_head",)
    assert recipe.resolve_path("source.path") == (tmp_path / "models" / "llama").resolve()
    assert recipe.resolve_path("output.dir") == (tmp_path / "family" / "variants" / "out").resolve()
    default = load_recipe(write(tmp_path, "d.yaml", MINIMAL))
    assert default.resolve_path("output.dir") == (tmp_path / "build" / "tiny").resolve()


EQUIVALENT = [
    MINIMAL + "mapping: {tp_size: 2}\nquantization: {smoothquant_alpha: 0.5}\n",
    # keys in another order, flow vs block style, explicit defaults, 1/2 written as 0.50, "{{ }}"
    "name: tiny\nsource: {path: model}\nrecipe_version: 1\n"
    "quantization:\n  smoothquant_alpha: 0.50\n  algo: none\n"
    "mapping:\n  pp_size: 1\n  tp_size: 2.0\n",
    "recipe_version: 1\nname: tiny\nvars: {tp: 2}\nsource:\n  path: model\n  dtype: auto\n"
    "mapping: {tp_size: '{{ tp }}'}\nworkers: 1\n",
]


def test_semantically_equal_recipes_hash_equal(tmp_path):
    hashes = {load_recipe(write(tmp_path, f"r{i}.yaml", text)).canonical_hash()
              for i, text in enumerate(EQUIVALENT)}
    assert len(hashes) == 1


def test_extends_gives_the_same_hash_as_the_flat_recipe(tmp_path):
    flat = load_recipe(write(tmp_path, "flat.yaml", EQUIVALENT[0]))
    write(tmp_path, "base.yaml", MINIMAL.replace("name: tiny", "name: base") + "quantization: {algo: w8a16}\n")
    child = load_recipe(write(tmp_path, "child.yaml", "extends: base.yaml\nname: tiny\nmapping: {tp_size: 2}\n"
                                                      "quantization: {algo: none}\n"))
    assert child.canonical_json() == flat.canonical_json()


@pytest.mark.parametrize("edit", [
    ("tp_size: 2", "tp_size: 4"),
    ("smoothquant_alpha: 0.5", "smoothquant_alpha: 0.6"),
    ("path: model", "path: model2"),
    ("name: tiny", "name: tiny2"),
])
def test_one_field_change_changes_the_hash(tmp_path, edit):
    base = load_recipe(write(tmp_path, "a.yaml", EQUIVALENT[0])).canonical_hash()
    changed = load_recipe(write(tmp_path, "b.yaml", EQUIVALENT[0].replace(*edit))).canonical_hash()
    assert base != changed


def test_canonical_json_is_sorted_and_compact(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.yaml", MINIMAL))
    text = recipe.canonical_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert text.startswith('{"description":"","mapping":{"embedding_sharding_dim":0,')


def test_show_output_is_stable(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, "show", "recipes/llama-70b-int8-tp4.yaml")
    assert code == 0, err
    assert out == (GOLDEN / "show-llama-70b-int8-tp4.yaml").read_text()


def test_show_json_is_the_canonical_form(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, out, _ = run_cli(capsys, "show", "recipes/llama-70b-int8-tp4.yaml", "--format", "json")
    assert code == 0
    assert out.strip() == load_recipe("recipes/llama-70b-int8-tp4.yaml").canonical_json()
