"""Plan-time rules that need the source's config.json, reported at the recipe field they concern."""
from __future__ import annotations

import json

from tests.recipe_files import run_cli, write


def _recipe(tmp_path, model, extra: str = "", tp: int = 3) -> str:
    text = f"recipe_version: 1\nname: t\nsource:\n  path: {model}\nmapping:\n  tp_size: {tp}\n{extra}"
    return str(write(tmp_path, "r.yaml", text))


def test_tp_not_dividing_heads_is_located(tiny_model, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", _recipe(tmp_path, tiny_model("gqa")))
    assert code == 2
    assert "r.yaml:6:12: mapping.tp_size: tp_size=3 does not divide num_attention_heads=8" in err
    assert "allowed: 1, 2, 4, 8" in err and "Traceback" not in err


def test_awq_group_size_must_divide_the_model(tiny_model, tmp_path, capsys):
    path = _recipe(tmp_path, tiny_model("gqa"), "quantization:\n  algo: w4a16_awq\n  group_size: 128\n"
                                               "  calibration: {dataset: c.txt}\n", tp=1)
    code, _, err = run_cli(capsys, "plan", path)
    assert code == 2
    assert ("r.yaml:9:15: quantization.group_size: group_size=128 x tp_size=1 does not divide the model's "
            "hidden_size=64") in err


def test_smoothquant_refuses_kv_duplication(tiny_model, tmp_path, capsys):
    path = _recipe(tmp_path, tiny_model("gqa"), "quantization:\n  algo: w8a8_sq_per_tensor\n"
                                               "  calibration: {dataset: c.txt}\n", tp=4)
    code, _, err = run_cli(capsys, "plan", path)
    assert code == 2
    assert "r.yaml:6:12: mapping.tp_size: SmoothQuant checkpoints cannot duplicate KV heads: tp_size=4 exceeds " \
           "num_key_value_heads=2" in err


def test_unsupported_architecture_is_named(tmp_path, capsys):
    model = tmp_path / "gpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    code, _, err = run_cli(capsys, "plan", _recipe(tmp_path, model))
    assert code == 2
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "MistralForCausalLM" in err
    assert "Traceback" not in err


def test_build_of_missing_source_says_where(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", _recipe(tmp_path, tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c"))
    assert code == 2
    assert f"r.yaml:4:9: source.path: source model {tmp_path / 'nowhere'}: directory {tmp_path / 'nowhere'} does not exist" in err
