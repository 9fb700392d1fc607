"""The verify stage inside `recipe build`, and `recipe verify` on its own: reports, exit codes,
cache keys."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_runner.api import convert
from recipe_runner.pipeline.build import run_build
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.lock import read_lock
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from tests.recipe_files import REPO, run_cli
from tests.test_build_quantized import write_recipe as write_quantized_recipe

RECIPE = """\
recipe_version: 1
name: tiny-verified
source:
  path: {model}
  dtype: float16
mapping:
  tp_size: 2
  pp_size: 2
output:
  dir: out
verify:
  prompts: ["The capital of France is", "def fibonacci(n):"]
  token_ids: [[1, 2, 3, 4]]
{extra}"""


def write_recipe(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model, extra=extra))
    return path


def build(recipe: Path, cache: Path):
    return run_build(make_plan(load_recipe(recipe)), store=CacheStore(cache), echo=lambda _: None)


def test_build_publishes_the_verify_report(tiny_model, tmp_path, capsys):
    model = tiny_model("gqa", with_tokenizer=True)
    recipe = write_recipe(tmp_path, model)
    result = build(recipe, tmp_path / "cache")
    assert {t["stage"]: t["action"] for t in result.trace} == {"convert": "ran", "shard": "ran", "verify": "ran"}
    lock = read_lock(result.lock_path)
    assert sorted(n for n in lock.outputs if n.startswith("verify/")) == ["verify/verify.json", "verify/verify.md"]
    shard_key = next(s["key"] for s in lock.stages if s["name"] == "shard")
    report = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    loaded = load_recipe(recipe)
    assert report["passed"] is True and report["failures"] == []
    assert report["recipe"] == {"name": "tiny-verified", "sha256": loaded.canonical_hash()}
    assert report["checkpoint"]["stage_key"] == shard_key and report["checkpoint"]["path"] is None
    assert report["tolerance_sources"]["mean_kl"] == "default for none"
    assert [i["label"] for i in report["inputs"]] == ["prompt 1", "prompt 2", "token_ids 1"]
    markdown = (result.output_dir / "verify" / "verify.md").read_text()
    assert "# Verification passed: tiny-verified" in markdown
    assert loaded.canonical_hash() in markdown and shard_key in markdown
    assert "| top-1 agreement | 1 | >= 0.98 | default for none | ok |" in markdown
    # the report is part of the bit-identical outputs a locked rebuild checks
    code, out, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(tmp_path / "cache"),
                             "--locked", str(result.lock_path))
    assert code == 0, err
    assert "3 stage(s) run" in out and "bit-identical" in out


def test_out_of_tolerance_fails_the_build_naming_the_figure(tiny_model, tmp_path, capsys):
    model = tiny_model("gqa", with_tokenizer=True)
    recipe = write_recipe(tmp_path, model, "  tolerances: {max_abs_logit_error: 1.0e-12}\n")
    code, _, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(tmp_path / "cache"))
    assert code == 1
    assert "verify: the checkpoint (unquantized, tp_size 2, pp_size 2) does not reproduce" in err
    assert "max_abs_logit_error" in err and "> 1e-12 (recipe)" in err
    assert "mean_kl" not in err  # only the failing figure is named
    assert not (tmp_path / "out" / "verify").exists()
    # nothing of a failed check is cached: the next build verifies again
    code, _, _ = run_cli(capsys, "build", str(recipe), "--cache-dir", str(tmp_path / "cache"), "--no-verify")
    assert code == 0 and not (tmp_path / "out" / "verify").exists()
    assert (tmp_path / "out" / "checkpoint" / "rank3.safetensors").is_file()


def test_verify_key_follows_tokenizer_and_tolerances_only(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa", with_tokenizer=True))
    cache = tmp_path / "cache"
    build(write_recipe(tmp_path, model), cache)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_max_length"] = 4096
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    again = build(write_recipe(tmp_path, model), cache)
    assert {t["stage"]: t["action"] for t in again.trace} == {"convert": "cached", "shard": "cached", "verify": "ran"}
    looser = build(write_recipe(tmp_path, model, "  tolerances: {mean_kl: 0.5}\n"), cache)
    assert {t["stage"]: t["action"] for t in looser.trace} == {"convert": "cached", "shard": "cached", "verify": "ran"}
    stage = make_plan(load_recipe(write_recipe(tmp_path, model))).stage("verify")
    assert stage.inputs == ("shard", "source", "tokenizer")


VERIFY_SECTION = """\
verify:
  prompts: ["The capital of France is", "def fibonacci(n):", "Explain tensor parallelism in one sentence:"]
"""


@pytest.mark.parametrize("algo, tp, kv", [
    ("w8a16", 2, "none"),
    ("w4a16_awq", 1, "none"),  # group 64 x tp must divide hidden_size 64
    ("fp8", 2, "fp8"),
    ("w8a8_sq_per_channel_per_token", 2, "int8"),
    ("w8a8_sq_per_tensor", 2, "none"),
])
def test_quantize_stage_output_passes_its_default_tolerances(tiny_model, tmp_path, algo, tp, kv):
    model = tiny_model("gqa", with_tokenizer=True)
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog.\nA recipe is reviewed in git.\n"
                                        "Tensor parallelism splits each weight matrix across GPUs.\n")
    recipe = write_quantized_recipe(tmp_path, model, tmp_path / "calib.txt", algo=algo, kv=kv, tp=tp)
    recipe.write_text(recipe.read_text() + VERIFY_SECTION)
    result = build(recipe, tmp_path / "cache")
    report = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    assert report["passed"], report["failures"]
    assert report["checkpoint"]["quant_algo"] is not None
    assert report["figures"]["mean_abs_logit_error"] > 1e-3  # the quantization was simulated


# ---- recipe verify ----------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tiny_model, tmp_path) -> tuple[Path, Path]:
    model = tiny_model("gqa", with_tokenizer=True)
    return convert(model, tmp_path / "ckpt", tp_size=2), model


def test_cli_pass_writes_the_report(checkpoint, tmp_path, capsys):
    ckpt, model = checkpoint
    code, out, err = run_cli(capsys, "verify", str(ckpt), "--source", str(model), "--prompt", "The capital of France is",
                             "--token-ids", "1, 2,3", "--mean-kl", "0.001", "--report-dir", str(tmp_path / "report"))
    assert code == 0, err
    assert "2 input(s)" in out and "\nPASS\nreport: " in out
    assert "(command line)" in out
    report = json.loads((tmp_path / "report" / "verify.json").read_text())
    assert report["passed"] and report["recipe"] is None and report["checkpoint"]["path"] == str(ckpt)
    assert report["tolerances"]["mean_kl"] == 0.001 and report["tolerance_sources"]["mean_kl"] == "command line"
    assert "# Verification passed: standalone check" in (tmp_path / "report" / "verify.md").read_text()


def test_cli_out_of_tolerance_exits_1(checkpoint, capsys):
    ckpt, model = checkpoint
    code, out, _ = run_cli(capsys, "verify", str(ckpt), "--source", str(model), "--token-ids", "5,6,7",
                           "--max-abs-logit-error", "1e-12")
    assert code == 1
    assert "max_abs_logit_error" in out and "OUT OF TOLERANCE" in out and out.rstrip().endswith("FAIL")


def test_cli_broken_layout_exits_1(checkpoint, capsys):
    ckpt, model = checkpoint
    (ckpt / "rank1.safetensors").unlink()
    code, _, err = run_cli(capsys, "verify", str(ckpt), "--source", str(model), "--token-ids", "5,6,7")
    assert code == 1 and "rank1.safetensors missing" in err


@pytest.mark.parametrize("args, message", [
    (["--token-ids", "1,x"], "expected comma-separated non-negative integers"),
    (["--token-ids", "1,5000"], "token id 5000 is outside the vocabulary (vocab_size 1001)"),
    (["--token-ids", "1", "--min-top1-agreement", "2"], "must be between 0 and 1"),
])
def test_cli_bad_input_exits_2(checkpoint, capsys, args, message):
    ckpt, model = checkpoint
    code, _, err = run_cli(capsys, "verify", str(ckpt), "--source", str(model), *args)
    assert code == 2 and message in err


def test_cli_without_inputs_runs_the_default_prompts(checkpoint, tmp_path, capsys):
    from recipe_runner.demo import demo_prompts

    ckpt, model = checkpoint
    code, out, err = run_cli(capsys, "verify", str(ckpt), "--source", str(model), "--report-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert out.startswith("no --prompt or --token-ids given: verifying on the 2 built-in default prompts (the demo "
                          "recipe's verify.prompts): 'The capital of France is', 'def fibonacci(n):'\n")
    report = json.loads((tmp_path / "r" / "verify.json").read_text())
    assert [i["prompt"] for i in report["inputs"]] == demo_prompts() == ["The capital of France is", "def fibonacci(n):"]
    assert f"2 input(s), {report['figures']['tokens']} tokens" in out and report["figures"]["tokens"] >= 4
    assert report["passed"] and report["figures"]["max_abs_logit_error"] < 1e-3 and "\nPASS\n" in out


def test_cli_default_prompts_without_a_tokenizer_fail_before_loading_anything(tiny_model, tmp_path, capsys):
    """A source without tokenizer files: exit 2 at once, naming the remedy, torch never imported
    (the checkpoint is not even read)."""
    model = tiny_model("gqa")  # no tokenizer
    script = ("import sys\nfrom recipe_runner.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script, "verify", str(tmp_path / "no-checkpoint"), "--source", str(model)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.stdout.strip() == "exit 2 False", run.stdout + run.stderr
    assert (f"error: verify's default prompts (used when no --prompt or --token-ids is given) are tokenized with the "
            f"source model's tokenizer, but {model} has none (tokenizer.json, tokenizer.model or vocab.json); copy "
            "the tokenizer files there or give token ids instead (verify.token_ids / --token-ids)") in run.stderr
    # token ids need no tokenizer: the same source then gets as far as the (missing) checkpoint
    code, _, err = run_cli(capsys, "verify", str(tmp_path / "no-checkpoint"), "--source", str(model), "--token-ids", "1")
    assert code == 2 and "no config.json" in err and "tokenizer" not in err


def test_cli_bad_directories_exit_2(checkpoint, tiny_model, tmp_path, capsys):
    ckpt, model = checkpoint
    code, _, err = run_cli(capsys, "verify", str(tmp_path), "--source", str(model), "--token-ids", "1")
    assert code == 2 and "no config.json" in err
    code, _, err = run_cli(capsys, "verify", str(ckpt), "--source", str(tiny_model("mha")), "--token-ids", "1")
    assert code == 2 and "num_key_value_heads 2 vs 8" in err
    code, _, err = run_cli(capsys, "verify", str(ckpt), "--source", str(tiny_model("gqa")), "--prompt", "hi")
    assert code == 2 and "has none (tokenizer.json" in err
