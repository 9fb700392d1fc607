"""scripts/trtllm_release_facts.py and the TensorRT-LLM facts it recorded (recipe_runner/data/trtllm/).

The generator is checked on two small synthetic source trees (tests/data/trtllm_source/, written for
these tests in the shape of TensorRT-LLM's files; no TensorRT-LLM code is checked in): it must
reproduce the committed expected JSON byte for byte. The recorded real releases are checked for the
facts config.json and trtllm-build depend on. No test reads the network or a git mirror, except
test_recorded_data_regenerates, which runs only when TRTLLM_FACTS_GIT_DIR names a TensorRT-LLM git
dir holding the recorded commits.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipe_runner" / "data" / "trtllm"
FIXTURES = ROOT / "tests" / "data" / "trtllm_source"
EXPECTED = ROOT / "tests" / "data" / "trtllm_expected"
FIXTURE_RELEASES = {"strict": ("9.1", "v9.1.0"), "lenient": ("9.2", "v9.2.0")}
ZERO = "0" * 40


def _load_generator():
    spec = importlib.util.spec_from_file_location("trtllm_release_facts",
                                                  ROOT / "scripts" / "trtllm_release_facts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _generate(tmp_path: Path, name: str, out: Path, *extra: str) -> int:
    release, tag = FIXTURE_RELEASES[name]
    return gen.main(["--source-dir", str(FIXTURES / name), "--tag", tag, "--commit", ZERO,
                     "--source-repo", f"fixture/{name}", "--out", str(out), *extra])


def _releases() -> list[dict]:
    return json.loads((DATA / "releases.json").read_text())["releases"]


def _facts(release: str) -> dict:
    return json.loads((DATA / f"{release}.json").read_text())


def _v(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


# ------------------------------------------------------------------ the generator


def test_generator_reproduces_expected_fixture_output(tmp_path):
    out = tmp_path / "out"
    for name in FIXTURE_RELEASES:
        assert _generate(tmp_path, name, out) == 0
    for path in sorted(EXPECTED.iterdir()):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in EXPECTED.iterdir())


def test_check_mode_compares_without_writing(tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(EXPECTED, out)
    assert _generate(tmp_path, "strict", out, "--check") == 0
    doc = out / "9.1.json"
    doc.write_text(doc.read_text().replace('"group_size"', '"group_sizes"'))
    assert _generate(tmp_path, "strict", out, "--check") == 1
    assert "DIFFERS" in capsys.readouterr().out
    assert '"group_sizes"' in doc.read_text()  # --check wrote nothing


def test_fixture_facts_are_what_the_source_says():
    strict = json.loads((EXPECTED / "9.1.json").read_text())
    lenient = json.loads((EXPECTED / "9.2.json").read_text())
    # dataclass + from_dict(cls(**config)) -> TypeError on unknown keys; filtered from_dict -> ignored
    assert strict["quant_config"]["unknown_keys"] == "error"
    assert lenient["quant_config"]["unknown_keys"] == "ignored"
    assert lenient["quant_config"]["path"] == "tensorrt_llm/quantization/quant_config.py"  # import followed
    assert strict["pretrained_config"]["extra_kwargs"]["unknown_keys"] == "kept"
    assert lenient["pretrained_config"]["extra_kwargs"]["unknown_keys"] == "ignored"
    assert strict["llama_config"]["extra_kwargs"]["unknown_keys"] == "passed_on"
    assert strict["mapping"]["unknown_keys"] == "error"
    assert strict["quant_algos"] == ["W8A16", "W4A16_AWQ", "FP8", "INT8"]
    assert lenient["quant_algos_source"]["values"]["NVFP4"] == "NVFP4"
    options = {o["flag"]: o for o in strict["trtllm_build_options"]}
    assert options["--max_batch_size"]["default"] == 16  # BuildConfig.max_batch_size resolved
    assert options["--output_cache"]["default"] == "cache.bin"  # field(default=...) resolved
    assert options["--other"]["default"] == "unresolved: BuildConfig.extras"  # default_factory
    assert options["--other"]["choices"] == "unresolved: OTHER_CHOICES"  # import of a missing file
    assert options["--log_level"]["choices"] == ["error", "info"]  # severity_map.keys()
    assert options["--max_seq_len"]["aliases"] == ["--max_decoder_seq_len"]
    assert options["--gemm_plugin"] == {**options["--gemm_plugin"], "default": "disable",
                                        "choices": ["auto", "fp8", "disable"], "group": "plugin"}
    assert options["--fused_thing"]["help"] == "Whether to enable/disable fused_thing."
    assert options["--block_size"]["type"] == "int" and options["--block_size"]["default"] == 32
    assert "--dtype" not in options  # not in the exposed list


def test_unknown_source_shape_is_an_error_not_a_guess(tmp_path, capsys):
    tree = tmp_path / "src"
    shutil.copytree(FIXTURES / "strict", tree)
    build = tree / "tensorrt_llm" / "commands" / "build.py"
    build.write_text(build.read_text().replace(
        "    parser.add_argument('--dry_run'",
        "    for name in ['--a', '--b']:\n        parser.add_argument(name)\n    parser.add_argument('--dry_run'"))
    code = gen.main(["--source-dir", str(tree), "--tag", "v9.1.0", "--commit", ZERO, "--out", str(tmp_path / "o")])
    assert code == 2
    assert "does not follow" in capsys.readouterr().err


def test_version_must_match_the_tag(tmp_path, capsys):
    code = gen.main(["--source-dir", str(FIXTURES / "strict"), "--tag", "v9.3.0", "--commit", ZERO,
                     "--out", str(tmp_path / "o")])
    assert code == 2
    assert "9.1.0" in capsys.readouterr().err


# ------------------------------------------------------------------ the recorded releases


def test_releases_index_is_ordered_and_complete():
    releases = _releases()
    names = [r["release"] for r in releases]
    assert names == sorted(names, key=_v)
    assert names[0] == "0.12"
    files = sorted(p.name for p in DATA.glob("*.json") if p.name != "releases.json")
    assert sorted(r["file"] for r in releases) == files
    for entry in releases:
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]), entry
        assert entry["tag"] == f"v{entry['release']}.0"
        facts = _facts(entry["release"])
        assert (facts["release"], facts["tag"], facts["commit"]) == (entry["release"], entry["tag"], entry["commit"])
        assert facts["version"] == entry["version"] == f"{entry['release']}.0"
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", facts["source_repo"])


def test_recorded_files_are_in_canonical_form():
    for path in DATA.glob("*.json"):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=1, ensure_ascii=True) + "\n", path


def test_every_section_names_the_files_it_came_from():
    for entry in _releases():
        facts = _facts(entry["release"])
        read = facts["files_read"]
        assert all(re.fullmatch(r"[0-9a-f]{40}", sha) for sha in read.values())
        for section in ("quant_config", "pretrained_config", "llama_config", "mapping", "quant_algos_source",
                        "trtllm_build_source"):
            assert facts[section]["path"] in read, (entry["release"], section)
        for option in facts["trtllm_build_options"]:
            assert option["source"].split(":")[0] in read


def test_use_meta_recipe_appears_in_0_15():
    for entry in _releases():
        facts = _facts(entry["release"])
        fields = [f["name"] for f in facts["quant_config"]["fields"]]
        assert ("use_meta_recipe" in fields) == (_v(entry["release"]) >= (0, 15)), entry["release"]
    q14 = _facts("0.14")["quant_config"]
    assert q14["unknown_keys"] == "error"  # 0.14 refuses a config.json carrying use_meta_recipe
    assert q14["dataclass"] is True and "cls(**config)" in q14["from_dict"]["evidence"]
    assert [f["name"] for f in q14["fields"]] == [
        "quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
        "has_zero_point", "pre_quant_scale", "exclude_modules"]
    assert [f["default_value"] for f in q14["fields"]] == [None, None, 128, 0.5, None, False, False, None]
    assert "use_meta_recipe" in [f["name"] for f in _facts("0.15")["quant_config"]["fields"]]


def test_config_json_strictness_per_release():
    for entry in _releases():
        facts = _facts(entry["release"])
        assert facts["quant_config"]["unknown_keys"] == "error"
        assert facts["mapping"]["unknown_keys"] == "error"
        assert facts["pretrained_config"]["extra_kwargs"]["unknown_keys"] == "kept"
        assert facts["llama_config"]["extra_kwargs"]["unknown_keys"] == "passed_on"
        assert "QuantConfig.from_dict(quantization)" in [c["call"] for c in facts["pretrained_config"]["quantization_from"]]
        mapping = [p["name"] for p in facts["mapping"]["parameters"]]
        assert {"world_size", "tp_size", "pp_size"} <= set(mapping)


def test_quant_algos():
    first_nvfp4 = None
    for entry in _releases():
        facts = _facts(entry["release"])
        algos = facts["quant_algos"]
        assert {"W8A16", "W4A16", "W4A16_AWQ", "FP8", "W8A8_SQ_PER_CHANNEL"} <= set(algos), entry["release"]
        assert facts["kv_cache_quant_algos"][:2] == ["FP8", "INT8"]
        if "NVFP4" in algos and first_nvfp4 is None:
            first_nvfp4 = entry["release"]
    # None of the recorded releases through 0.16 has NVFP4 (the 0.17 notes add FP4/Blackwell support).
    assert first_nvfp4 is None or _v(first_nvfp4) >= (0, 17)
    assert "NVFP4" not in _facts("0.16")["quant_algos"]
    assert "MIXED_PRECISION" not in _facts("0.13")["quant_algos"]
    assert "MIXED_PRECISION" in _facts("0.14")["quant_algos"]


def test_trtllm_build_options():
    for entry in _releases():
        options = {o["flag"]: o for o in _facts(entry["release"])["trtllm_build_options"]}
        for option in options.values():
            assert set(option) >= {"flag", "aliases", "dest", "type", "default", "choices", "nargs",
                                   "action", "group", "help", "source"}
        assert "--checkpoint_dir" in options and "--gemm_plugin" in options
        assert "--fuse_fp4_quant" not in options or _v(entry["release"]) >= (0, 17)
        assert ("--kv_cache_type" in options) == (_v(entry["release"]) >= (0, 13)), entry["release"]
        assert options["--gpt_attention_plugin"]["choices"][-1] == "disable"
    o12 = {o["flag"]: o for o in _facts("0.12")["trtllm_build_options"]}
    assert "--fuse_fp4_quant" not in o12
    assert o12["--use_fused_mlp"]["action"] == "store_true"  # 0.13 turned it into an enable/disable plugin flag
    o16 = {o["flag"]: o for o in _facts("0.16")["trtllm_build_options"]}
    assert o16["--max_batch_size"]["default"] == 2048  # resolved from BuildConfig.max_batch_size
    assert o16["--tokens_per_block"]["default"] == 64
    assert o16["--use_paged_context_fmha"]["default"] == "disable"
    assert "--enable_xqa" not in o16 and "--enable_xqa" in {o["flag"] for o in _facts("0.15")["trtllm_build_options"]}
    assert "nvfp4" not in o16["--gemm_plugin"]["choices"]


@pytest.mark.skipif(not os.environ.get("TRTLLM_FACTS_GIT_DIR"),
                    reason="set TRTLLM_FACTS_GIT_DIR to a TensorRT-LLM git dir holding the recorded commits")
def test_recorded_data_regenerates(tmp_path):
    out = tmp_path / "trtllm"
    shutil.copytree(DATA, out, ignore=shutil.ignore_patterns("*.md"))
    assert gen.main(["--git-dir", os.environ["TRTLLM_FACTS_GIT_DIR"], "--all", "--check", "--out", str(out)]) == 0
