"""The `recipe` command as a user runs it: help, version, schema, plan text, build refusals."""
from __future__ import annotations

import json
import subprocess
import sys

from recipe_runner import __version__
from recipe_runner.recipe.schema import recipe_schema, schema_path
from tests.recipe_files import MINIMAL, REPO, run_cli, write


def test_version(capsys):
    assert run_cli(capsys, "--version") == (0, f"recipe-runner {__version__}\n", "")


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("validate", "show", "plan", "build", "schema", "demo"):
        assert command in out


def test_console_script_reports_errors_without_traceback(tmp_path):
    bad = write(tmp_path, "bad.yaml", MINIMAL + "mapping: {tp_size: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "recipe_runner.cli", "plan", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "mapping.tp_size: -1 is less than the minimum of 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_schema_command_prints_the_schema_file(capsys):
    code, out, _ = run_cli(capsys, "schema")
    assert code == 0 and json.loads(out) == recipe_schema()
    assert schema_path() == (REPO / "schema" / "recipe.v1.schema.json").resolve()
    code, out, _ = run_cli(capsys, "schema", "--path")
    assert out.strip() == str(schema_path())


def test_schema_is_draft_2020_12_and_closed():
    schema = recipe_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

    def closed(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                closed(child, f"{where}.{key}")

    closed(schema, "$")


def test_plan_text_lists_stages_inputs_and_params(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, "plan", "recipes/llama-3.1-70b-int4-awq-tp2-pp2.yaml")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "plan for recipes/llama-3.1-70b-int4-awq-tp2-pp2.yaml"
    stage_lines = [line.strip() for line in lines if line.strip()[:2] in {f"{i}." for i in range(1, 10)}]
    assert [line.split()[1] for line in stage_lines] == ["convert", "calibrate", "quantize", "shard",
                                                         "verify", "build-engine"]
    assert stage_lines[-1].endswith("<- shard  (after verify)")
    assert "<- source, calibration-data" in stage_lines[1]
    assert "tp_size=2 pp_size=2" in out and "algo=w4a16_awq" in out and "group_size=128" in out
    assert "note: source model not available here" in out


def test_plan_stages_follow_the_recipe(tmp_path, capsys):
    def stages(extra: str, *flags: str) -> list[str]:
        path = write(tmp_path, "r.yaml", MINIMAL + extra)
        code, out, err = run_cli(capsys, "plan", str(path), "--format", "json", *flags)
        assert code == 0, err
        return [s["name"] for s in json.loads(out)["recipes"][0]["stages"]]

    assert stages("") == ["convert", "shard"]
    assert stages("quantization: {algo: w8a16}\n") == ["convert", "quantize", "shard"]
    assert stages("quantization: {kv_cache: fp8, calibration: {dataset: c.txt}}\n") == [
        "convert", "calibrate", "quantize", "shard"]
    engine = "engine: {max_seq_len: 4096}\nverify: {prompts: [hi]}\n"
    assert stages(engine) == ["convert", "shard", "verify", "build-engine"]
    assert stages(engine, "--no-verify") == ["convert", "shard", "build-engine"]
    assert stages(engine, "--until", "checkpoint") == ["convert", "shard", "verify"]
    assert stages(engine, "--until", "checkpoint", "--no-verify") == ["convert", "shard"]


def test_stage_params_hold_only_their_fields(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, out, _ = run_cli(capsys, "plan", "recipes/llama-2-13b-sq-tp2.yaml", "--format", "json")
    params = {s["name"]: s["params"] for s in json.loads(out)["recipes"][0]["stages"]}
    assert params["convert"] == {"dtype": "float16", "trust_remote_code": False}
    assert params["shard"] == {"tp_size": 2, "pp_size": 1, "use_parallel_embedding": False,
                               "embedding_sharding_dim": 0, "tensorrt_llm": "0.16"}  # config.json's release
    assert params["calibrate"]["statistics"] == ["smoothquant", "kv"]
    assert "description" not in json.dumps(params)
    assert "max_batch_size" in params["build-engine"] and "tp_size" not in params["build-engine"]


def test_until_unknown_stage(tmp_path, capsys):
    path = write(tmp_path, "r.yaml", MINIMAL)
    code, _, err = run_cli(capsys, "plan", str(path), "--until", "build-engine")
    assert code == 2
    assert "--until build-engine: this recipe has no such stage (its stages: convert, shard, checkpoint)" in err

