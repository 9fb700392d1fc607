"""Answers for CI: `--format json` of validate, plan and build (one versioned shape each, pinned by
golden files under tests/golden/json/), `plan --check` (the preflight), `build --dry-run`,
`--verbose` / `--quiet`, shell completion.

Re-record the golden JSON (only when a shape is meant to change; bump its format version then):

    RECIPE_RECORD_GOLDEN=1 pytest tests/test_cli_machine.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.recipe_files import run_cli, write

GOLDEN = Path(__file__).resolve().parent / "golden" / "json"

TINY = """\
recipe_version: 1
name: tiny-json
source:
  path: model
mapping:
  tp_size: 2
output:
  dir: out
"""

PREFLIGHT = """\
recipe_version: 1
name: tiny
source:
  path: missing-model
quantization:
  algo: w8a8_sq_per_channel
  calibration:
    dataset: missing.txt
engine:
  max_seq_len: 2048
output:
  dir: out
"""


def normalized(text: str, tmp: Path) -> dict:
    """The document with this test's directory as <tmp>, cache keys as <key>, timings and peak memory as 0."""
    doc = json.loads(text.replace(str(tmp), "<tmp>"))

    def walk(node):
        if isinstance(node, dict):
            return {k: ("<key>" if k == "key" and isinstance(v, str) else
                        0 if k in ("seconds", "peak_rss_bytes") and v is not None else walk(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(doc)


def assert_golden(name: str, doc: dict) -> None:
    path = GOLDEN / name
    if os.environ.get("RECIPE_RECORD_GOLDEN"):
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    assert doc == json.loads(path.read_text()), f"{name} changed; re-record with RECIPE_RECORD_GOLDEN=1 if meant"


@pytest.fixture
def tiny_recipe(tiny_model, tmp_path, monkeypatch) -> Path:
    shutil.copytree(tiny_model("gqa"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    return write(tmp_path, "tiny.yaml", TINY)


def test_json_documents_of_validate_plan_and_build(tiny_recipe, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    code, out, err = run_cli(capsys, "validate", "tiny.yaml", "--format", "json")
    assert (code, err) == (0, "")
    assert_golden("validate.json", normalized(out, tmp_path))
    code, out, err = run_cli(capsys, "plan", "tiny.yaml", "--format", "json", "--cache-dir", cache)
    assert code == 0, err
    assert_golden("plan.json", normalized(out, tmp_path))
    code, out, err = run_cli(capsys, "build", "tiny.yaml", "--format", "json", "--cache-dir", cache)
    assert code == 0, err
    assert "[convert] running" in err  # progress goes to stderr, the document alone to stdout
    doc = json.loads(out)
    assert [(s["name"], s["action"]) for s in doc["recipes"][0]["stages"]] == [("convert", "ran"), ("shard", "ran")]
    assert all(s["seconds"] > 0 and s["peak_rss_bytes"] > 2**20 for s in doc["recipes"][0]["stages"])
    assert_golden("build.json", normalized(out, tmp_path))
    record = json.loads((tmp_path / "out" / "build.json").read_text())  # the build that published out/
    assert record["format"] == "recipe-runner/build-record/1" and record["recipe"] == "tiny-json"
    assert [(s["stage"], s["action"]) for s in record["stages"]] == [("convert", "ran"), ("shard", "ran")]
    assert [s["seconds"] for s in record["stages"]] == [s["seconds"] for s in doc["recipes"][0]["stages"]]
    assert all(s["peak_rss_bytes"] > 2**20 for s in record["stages"])
    lock = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert "build.json" not in lock["outputs"] and "checkpoint/config.json" in lock["outputs"]
    code, _, err = run_cli(capsys, "verify-lock", str(tmp_path / "out" / "recipe.lock"))
    assert code == 0, err  # the record is beside the lock, not checked against it
    code, out, _ = run_cli(capsys, "build", "tiny.yaml", "--format", "json", "--cache-dir", cache)
    assert code == 0
    assert [s["action"] for s in json.loads(out)["recipes"][0]["stages"]] == ["cached", "cached"]


def test_plan_json_has_one_shape_for_one_recipe_or_several(tiny_recipe, tmp_path, capsys):
    write(tmp_path, "other.yaml", TINY.replace("tiny-json", "tiny-other").replace("dir: out", "dir: out2"))
    cache = str(tmp_path / "cache")
    one = json.loads(run_cli(capsys, "plan", "tiny.yaml", "--format", "json", "--cache-dir", cache)[1])
    code, out, err = run_cli(capsys, "plan", "tiny.yaml", "other.yaml", "--format", "json", "--cache-dir", cache)
    assert code == 0, err
    two = json.loads(out)
    assert set(one) == set(two) == {"format", "checked", "ok", "problems", "recipes", "shared"}
    assert one["format"] == two["format"] == "recipe-runner/plan/1"
    assert [r["name"] for r in two["recipes"]] == ["tiny-json", "tiny-other"]
    assert one["shared"] == [] and [s["stage"] for s in two["shared"]] == ["convert", "shard"]


def test_validate_json_lists_every_error_with_its_position(tmp_path, capsys):
    write(tmp_path, "good.yaml", TINY)
    write(tmp_path, "bad.yaml", TINY.replace("tp_size: 2", "tp_szie: 2") + "quantization: {algo: int9}\n")
    code, out, err = run_cli(capsys, "validate", str(tmp_path / "bad.yaml"), str(tmp_path / "good.yaml"),
                             "--format", "json")
    assert (code, err) == (2, "")
    doc = json.loads(out)
    assert doc["format"] == "recipe-runner/validate/1" and doc["ok"] is False
    bad, good = doc["files"]
    assert good["ok"] is True and good["errors"] == [] and good["recipes"][0]["name"] == "tiny-json"
    assert bad["ok"] is False and bad["recipes"] == []
    assert [(e["line"], e["column"], e["field"]) for e in bad["errors"]] == [
        (6, 3, "mapping.tp_szie"), (9, 22, "quantization.algo")]
    assert bad["errors"][0]["file"] == str(tmp_path / "bad.yaml")
    assert bad["errors"][0]["message"] == "unknown key 'tp_szie' in mapping (did you mean 'tp_size'?)"


def _preflight_lines(tmp_path: Path) -> list[str]:
    here = tmp_path.resolve()
    return [
        f"r.yaml:4:9: source.path: source model {here}/missing-model: directory {here}/missing-model does not exist",
        f"error: r.yaml:8:14: quantization.calibration.dataset: calibration file {here}/missing.txt not found; create it "
        "(one sample per line for .txt, one JSON object per line for .jsonl) or fix the path",
        "r.yaml:10:3: engine: this recipe builds an engine, but trtllm-build is not on PATH and `python -m "
        "tensorrt_llm.commands.build` is not importable: install TensorRT-LLM on a machine with an NVIDIA GPU "
        "(e.g. `pip install tensorrt-llm==0.14.0 --extra-index-url https://pypi.nvidia.com`, releases 0.12 to 1.2 "
        "ship trtllm-build), or stop at the checkpoint with `recipe build FILE --until checkpoint`",
        f"error: r.yaml:12:8: output.dir: {here}/out is not empty and was not written by recipe-runner (1 entries: "
        "mine.txt); choose an empty or new output.dir, or pass --force to publish beside these files (none of "
        "them is changed or removed)",
    ]


@pytest.fixture
def broken(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no trtllm-build here
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not recipe-runner's\n")
    return write(tmp_path, "r.yaml", PREFLIGHT)


def test_plan_check_reports_everything_before_running_sorted(broken, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "plan", "r.yaml", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and "note: source model not available here" in out  # plain plan: a note only
    code, out, err = run_cli(capsys, "plan", "r.yaml", "--check", "--cache-dir", str(tmp_path / "cache"))
    assert (code, out) == (2, "")
    assert err.splitlines() == [*_preflight_lines(tmp_path), "4 problem(s) found before running"]
    code, out, _ = run_cli(capsys, "plan", "r.yaml", "--check", "--format", "json", "--cache-dir", str(tmp_path / "c"))
    doc = json.loads(out)
    assert code == 2 and doc["checked"] is True and doc["ok"] is False
    assert [(p["line"], p["column"], p["field"]) for p in doc["problems"]] == [
        (4, 9, "source.path"), (8, 14, "quantization.calibration.dataset"), (10, 3, "engine"), (12, 8, "output.dir")]


def test_build_reports_every_preflight_problem_before_any_stage(broken, tmp_path, capsys):
    code, out, err = run_cli(capsys, "build", "r.yaml", "--cache-dir", str(tmp_path / "cache"))
    assert (code, out) == (2, "")
    assert err.splitlines() == _preflight_lines(tmp_path)
    assert not (tmp_path / "cache" / "entries").exists()
    code, out, err = run_cli(capsys, "build", "r.yaml", "--format", "json", "--cache-dir", str(tmp_path / "cache"))
    doc = json.loads(out)
    assert code == 2 and doc["format"] == "recipe-runner/build/2" and doc["exit_code"] == 2
    assert [str(p["line"]) for p in doc["problems"]] == ["4", "8", "10", "12"]
    assert doc["recipes"] == [{"name": "tiny", "recipe": "r.yaml", "status": "failed", "exit_code": 2,
                               "message": "not run: 4 problem(s) found before running (see problems)",
                               "seconds": 0, "stages": [], "outputs": None, "verify": None}]
    code, _, err = run_cli(capsys, "build", "r.yaml", "--dry-run", "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and err.splitlines() == _preflight_lines(tmp_path)


def test_preflight_finds_a_missing_config_and_tokenizer(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "empty/README", "no model here\n")
    write(tmp_path, "r.yaml", TINY.replace("path: model", "path: empty"))
    code, _, err = run_cli(capsys, "plan", "r.yaml", "--check")
    here = tmp_path.resolve()
    assert code == 2 and err.splitlines() == [
        f"r.yaml:4:9: source.path: source model {here}/empty: no config.json in {here}/empty; point to a Hugging "
        "Face model directory", "1 problem(s) found before running"]
    shutil.copytree(tiny_model("gqa"), tmp_path / "model")  # no tokenizer files
    write(tmp_path, "r.yaml", TINY + 'verify:\n  prompts: ["hello"]\n')
    code, _, err = run_cli(capsys, "plan", "r.yaml", "--check")
    assert code == 2 and err.splitlines() == [
        f"r.yaml:10:12: verify.prompts: the source model directory {here}/model has no tokenizer (tokenizer.json, "
        "tokenizer.model, vocab.json), which verify needs to tokenize verify.prompts (or give verify.token_ids); "
        "copy the model's tokenizer files into it", "1 problem(s) found before running"]
    code, out, err = run_cli(capsys, "plan", "r.yaml", "--check", "--no-verify")
    assert code == 0 and err == "preflight: OK, nothing found that would stop the build\n"
    assert out.startswith("plan for r.yaml\n")


def test_dry_run_keys_every_stage_and_runs_none(tiny_recipe, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    code, out, err = run_cli(capsys, "build", "tiny.yaml", "--dry-run", "--cache-dir", cache)
    assert code == 0, err
    assert out.startswith("plan for tiny.yaml\n") and "missing: never built" in out
    assert out.endswith("dry run: 2 stage(s) would run, 0 cached; nothing was built\n")
    assert not (tmp_path / "out").exists() and "[convert] running" not in out + err
    code, out, _ = run_cli(capsys, "build", "tiny.yaml", "--dry-run", "--format", "json", "--cache-dir", cache)
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "recipe-runner/plan/1" and doc["checked"] is True
    assert [s["cached"] for s in doc["recipes"][0]["stages"]] == [False, False]


def test_quiet_prints_only_the_summary_and_verbose_the_full_keys(tiny_recipe, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    code, out, err = run_cli(capsys, "build", "tiny.yaml", "-q", "--cache-dir", cache)
    assert code == 0 and err == ""
    assert re.fullmatch(r"built tiny-json: 2 stage\(s\) run, 0 cached; output \S+/out, lock \S+/out/recipe.lock\n"
                        r"  convert  ran +\d+\.\d s  peak \d+\.\d MiB\n  shard    ran +\d+\.\d s  peak \d+\.\d MiB\n", out)
    code, out, _ = run_cli(capsys, "build", "tiny.yaml", "-v", "--cache-dir", cache)
    assert code == 0
    keys = re.findall(r"^\[(convert|shard)\] tiny-json key ([0-9a-f]{64}): cached$", out, re.M)
    assert [stage for stage, _ in keys] == ["convert", "shard"]
    assert f"[convert] cached ({keys[0][1][:12]})" in out
    assert run_cli(capsys, "build", "tiny.yaml", "-v", "-q")[0] == 2


def test_build_json_carries_the_verify_figures(tiny_model, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_model("gqa"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "v.yaml", TINY + "verify:\n  token_ids: [[1, 2, 3, 4]]\n")
    code, out, err = run_cli(capsys, "build", "v.yaml", "--format", "json", "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    (recipe,) = json.loads(out)["recipes"]
    report = json.loads((tmp_path / "out" / "verify" / "verify.json").read_text())
    assert recipe["verify"] == {"report": str(tmp_path.resolve() / "out" / "verify" / "verify.json"),
                                "passed": True, "figures": report["figures"], "tolerances": report["tolerances"]}
    assert recipe["outputs"] == {"dir": str(tmp_path.resolve() / "out"),
                                 "lock": str(tmp_path.resolve() / "out" / "recipe.lock"),
                                 "build_record": str(tmp_path.resolve() / "out" / "build.json")}
    assert [s["name"] for s in recipe["stages"]] == ["convert", "shard", "verify"]


def test_shell_completion_options_exist(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out


def test_several_recipe_errors_print_in_file_order(tmp_path, capsys):
    write(tmp_path, "bad.yaml", "recipe_version: 1\nname: tiny\nworkers: 0\nquantization: {algo: int9}\n"
                                "mapping: {tp_szie: 2}\nsource:\n  path: model\n")
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "bad.yaml"))
    lines = [line.strip() for line in err.splitlines()[1:-1]]
    assert code == 2 and [line.split(": ", 1)[0].rsplit("/", 1)[1] for line in lines] == [
        "bad.yaml:3:10", "bad.yaml:4:22", "bad.yaml:5:11"]
