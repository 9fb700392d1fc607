"""Broken recipes: each fails with its file:line:col and message, exit code 2, no traceback."""
from __future__ import annotations

import pytest

from tests.recipe_files import MINIMAL, run_cli, write

BROKEN = {
    "wrong_type": (
        MINIMAL + "mapping:\n  tp_size: four\n",
        "bad.yaml:6:12: mapping.tp_size: 'four' is not of type 'integer'",
    ),
    "unknown_key": (
        MINIMAL + "colour: red\n",
        "bad.yaml:5:1: colour: unknown key 'colour' in the top level (allowed keys: recipe_version, name,",
    ),
    "typo_key": (
        MINIMAL + "mapping:\n  tp_szie: 2\n",
        "bad.yaml:6:3: mapping.tp_szie: unknown key 'tp_szie' in mapping (did you mean 'tp_size'?)",
    ),
    "bad_enum": (
        MINIMAL + "quantization:\n  algo: int9\n",
        "bad.yaml:6:9: quantization.algo: 'int9' is not one of ['none', 'w8a16', 'w4a16', 'w4a16_awq',",
    ),
    "tp_zero": (
        MINIMAL + "mapping:\n  tp_size: 0\n",
        "bad.yaml:6:12: mapping.tp_size: 0 is less than the minimum of 1",
    ),
    "missing_variable": (
        MINIMAL.replace("path: model", 'path: "{{ models_dir }}/llama"'),
        "bad.yaml:4:9: source.path: undefined variable 'models_dir': define it under `vars:` or pass "
        "--set models_dir=VALUE",
    ),
    "jinja_internals": (
        MINIMAL.replace("path: model", "path: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\""),
        "bad.yaml:4:9: source.path: template refused by the sandbox: access to attribute '__class__' of "
        "'str' object is unsafe",
    ),
    "python_tag": (
        MINIMAL + "description: !!python/object/apply:os.system ['echo pwned']\n",
        "bad.yaml:5:14: description: tag !!python/object/apply:os.system is not allowed",
    ),
    "duplicate_key": (
        MINIMAL + "mapping:\n  tp_size: 2\n  pp_size: 1\n  tp_size: 4\n",
        "bad.yaml:8:3: mapping.tp_size: duplicate key 'tp_size' (first set at line 6); keep only one",
    ),
    "missing_source": (
        "recipe_version: 1\nname: tiny\n",
        "bad.yaml:1:1: missing required key 'source'",
    ),
    "wrong_version": (
        MINIMAL.replace("recipe_version: 1", "recipe_version: 2"),
        "bad.yaml:1:17: recipe_version: 2 is not allowed; it must be 1",
    ),
    "unpinned_revision": (
        "recipe_version: 1\nname: tiny\nsource:\n  hub_id: meta-llama/Llama-3.1-8B\n  revision: main\n",
        "bad.yaml:5:13: source.revision: 'main' is not a commit sha; pin the 40-hex commit",
    ),
    "fp8_without_calibration": (
        MINIMAL + "quantization:\n  algo: fp8\n",
        "bad.yaml:6:3: quantization: fp8 needs calibration data: add quantization.calibration.dataset",
    ),
    "int8_kv_with_paged_context_fmha": (
        MINIMAL + "quantization:\n  kv_cache: int8\n  calibration: {dataset: c.txt}\n"
        "engine:\n  max_seq_len: 4096\n  use_paged_context_fmha: true\n",
        "bad.yaml:10:27: engine.use_paged_context_fmha: trtllm-build refuses paged context FMHA with an INT8 KV cache",
    ),
    "input_longer_than_sequence": (
        MINIMAL + "engine:\n  max_seq_len: 2048\n  max_input_len: 4096\n",
        "bad.yaml:7:18: engine.max_input_len: max_input_len=4096 exceeds max_seq_len=2048",
    ),
    "extra_arg_unknown": (
        MINIMAL + "engine:\n  max_seq_len: 4096\n  extra_args:\n    weight_sparsty: true\n",
        "bad.yaml:8:5: engine.extra_args.weight_sparsty: trtllm-build of TensorRT-LLM 0.16 has no option --weight_sparsty "
        "(did you mean 'weight_sparsity'?)",
    ),
    "extra_arg_managed": (
        MINIMAL + "engine:\n  max_seq_len: 4096\n  extra_args:\n    output_dir: /tmp/x\n",
        "bad.yaml:8:5: engine.extra_args.output_dir: --output_dir is set by recipe-runner",
    ),
    "extra_arg_duplicates_field": (
        MINIMAL + "engine:\n  max_seq_len: 4096\n  extra_args:\n    max_batch_size: 8\n",
        "bad.yaml:8:5: engine.extra_args.max_batch_size: --max_batch_size has its own recipe field; set "
        "engine.max_batch_size instead",
    ),
    "extra_arg_bad_choice": (
        MINIMAL + "engine:\n  max_seq_len: 4096\n  extra_args:\n    profiling_verbosity: loud\n",
        "bad.yaml:8:5: engine.extra_args.profiling_verbosity: --profiling_verbosity must be one of "
        "['layer_names_only', 'detailed', 'none'], not 'loud'",
    ),
    "engine_without_max_seq_len": (
        MINIMAL + "engine:\n  max_batch_size: 8\n",
        "bad.yaml:6:3: engine: missing required key 'max_seq_len' (Always required",
    ),
    "invalid_yaml": (
        MINIMAL + "mapping: [1, 2\n",
        "bad.yaml:6:1: invalid YAML:",
    ),
    "embedding_dim_without_parallel_embedding": (
        MINIMAL + "mapping:\n  embedding_sharding_dim: 1\n",
        "bad.yaml:6:27: mapping.embedding_sharding_dim: applies only with mapping.use_parallel_embedding: true",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_recipe_reports_location_and_exits_2(case, tmp_path, monkeypatch, capsys):
    text, expected = BROKEN[case]
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.yaml", text)
    code, out, err = run_cli(capsys, "validate", "bad.yaml")
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err + out
    assert out == ""


def test_every_error_is_reported_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.yaml", MINIMAL + "mapping:\n  tp_size: 0\n  pp_szie: 2\nquantization:\n  algo: int9\n")
    code, _, err = run_cli(capsys, "show", "bad.yaml")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("bad.yaml:")]
    assert [line.split(": ")[0] for line in lines] == ["bad.yaml:6:12", "bad.yaml:7:3", "bad.yaml:9:9"]


def test_cyclic_extends_names_the_cycle(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", "extends: b.yaml\n" + MINIMAL)
    write(tmp_path, "b.yaml", "extends: a.yaml\n" + MINIMAL)
    code, _, err = run_cli(capsys, "validate", "a.yaml")
    assert code == 2
    assert "b.yaml:1:10: extends: extends cycle: a.yaml -> b.yaml -> a.yaml" in err


def test_self_extends_is_a_cycle(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", "extends: a.yaml\n" + MINIMAL)
    code, _, err = run_cli(capsys, "validate", "a.yaml")
    assert code == 2
    assert "a.yaml:1:10: extends: extends cycle: a.yaml -> a.yaml" in err


def test_missing_base_is_reported_at_extends(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.yaml", MINIMAL + "extends: nowhere.yaml\n")
    code, _, err = run_cli(capsys, "validate", "a.yaml")
    assert code == 2
    assert "a.yaml:5:10: extends: base recipe nowhere.yaml not found" in err


def test_error_inside_a_base_points_into_the_base(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "base/common.yaml", MINIMAL + "quantization:\n  kv_cache: int4\n")
    write(tmp_path, "child.yaml", "extends: base/common.yaml\nname: child\n")
    code, _, err = run_cli(capsys, "validate", "child.yaml")
    assert code == 2
    assert "base/common.yaml:6:13: quantization.kv_cache: 'int4' is not one of ['none', 'int8', 'fp8']" in err


def test_validate_many_files_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "good.yaml", MINIMAL)
    write(tmp_path, "bad.yaml", MINIMAL + "workers: 0\n")
    code, out, err = run_cli(capsys, "validate", "good.yaml", "bad.yaml")
    assert code == 2
    assert out.startswith("OK   good.yaml (tiny, sha256 ")
    assert "FAIL bad.yaml" in err and "bad.yaml:5:10: workers: 0 is less than the minimum of 1" in err
    assert "1 of 2 recipe(s) invalid" in err


def test_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "show", "nope.yaml")
    assert code == 2
    assert "nope.yaml: file not found" in err


def test_bad_set_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "r.yaml", MINIMAL)
    code, _, err = run_cli(capsys, "show", "r.yaml", "--set", "no-equals-sign")
    assert code == 2
    assert "error: --set expects name=value" in err and "Traceback" not in err
