"""Strict model input: a damaged or hostile source model directory is refused at plan time with one
line naming the file (and tensor or key), exit 2, no traceback, before any stage runs; and no model
code (auto_map) runs unless the recipe allows it, even when stdin answers "y"."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import QUANT_MODEL
from tests.recipe_files import REPO, run_cli

K1 = "model.layers.1.self_attn.k_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
NORM = "model.norm.weight"
CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


# ---- hand-written safetensors files --------------------------------------------------------------

def raw_layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], bytes]:
    """A safetensors header (as a dict) and data region holding `tensors` contiguously, in order."""
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return header, b"".join(chunks)


def write_raw(path: Path, header: dict[str, Any] | str, data: bytes, length: int | None = None) -> None:
    """8-byte little-endian header length, the header JSON, the data region (the format's layout)."""
    blob = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def library_refuses(path: Path) -> bool:
    """Whether the safetensors library's own reader refuses the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception:  # SafetensorError
        return True
    return False


# ---- running the CLI -----------------------------------------------------------------------------

def recipe_for(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"recipe_version: 1\nname: strict\nsource:\n  path: {model}\noutput:\n  dir: {tmp_path / 'out'}\n"
                    + extra)
    return path


def refused(capsys, tmp_path: Path, model: Path, command: str = "build") -> str:
    """Run `recipe plan|build` on `model`; assert the one-line exit-2 refusal and that no stage ran."""
    argv = [command, str(recipe_for(tmp_path, model)), "--cache-dir", str(tmp_path / "cache")]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing published ...
    code, listing, _ = run_cli(capsys, "cache", "ls", "--cache-dir", str(tmp_path / "cache"))
    assert listing.startswith("0 entries")  # ... and no stage ran
    return err.strip()


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A copy of the 4-layer tiny LLaMA (hidden 64, 8 heads, 2 KV heads, fp16), safe to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("gqa"), dst)
    return dst


@pytest.fixture
def sharded(tiny_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model("sharded"), dst)
    return dst


def test_the_undamaged_model_builds_through_the_same_path(model, tmp_path, capsys):
    code, out, err = run_cli(capsys, "build", str(recipe_for(tmp_path, model)), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert (tmp_path / "out").is_dir()


# ---- safetensors headers -----------------------------------------------------------------------

def _v_shares_k(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    # v_proj given the very bytes of k_proj: converting would publish v == k
    header, data = raw_layout({n: t for n, t in tensors.items() if n != V1})
    header[V1] = dict(header[K1])
    return header, data


def _gap(tensors):
    header, data = raw_layout(tensors)
    begin, end = header[NORM]["data_offsets"]
    for entry in header.values():  # every tensor from the norm on moves 2 bytes up
        if entry["data_offsets"][0] >= begin:
            entry["data_offsets"] = [o + 2 for o in entry["data_offsets"]]
    return header, data[:begin] + b"\0\0" + data[begin:]


def _out_of_range(tensors):
    header, data = raw_layout(tensors)
    size = header[NORM]["data_offsets"][1] - header[NORM]["data_offsets"][0]
    header[NORM]["data_offsets"] = [10**12, 10**12 + size]
    return header, data


def _end_before_begin(tensors):
    header, data = raw_layout(tensors)
    header[NORM]["data_offsets"].reverse()
    return header, data


def _wrong_size(tensors):
    header, data = raw_layout(tensors)
    header[NORM]["shape"] = [63]
    return header, data


def _metadata(value):
    def damage(tensors):
        header, data = raw_layout(tensors)
        return {"__metadata__": value, **header}, data
    return damage


def _trailing(tensors):
    header, data = raw_layout(tensors)
    return header, data + b"xyz"


HEADER_CASES: dict[str, tuple[Callable, str]] = {
    "overlap": (_v_shares_k, f"tensor '{V1}' has data_offsets [{{k}}], overlapping tensor '{K1}' [{{k}}]; "
                             "tensors must not share bytes"),
    "gap": (_gap, f"tensor '{NORM}' begins at data offset {{norm0_plus_2}}, but the tensors before it end at "
                  "{norm0}; the format allows no gap between tensors"),
    "out of range": (_out_of_range, f"tensor '{NORM}' begins at data offset 1000000000000, but the tensors before it "
                                    "end at {norm0}"),
    "end before begin": (_end_before_begin, f"tensor '{NORM}' has data_offsets [{{norm1}}, {{norm0}}]: end before begin"),
    "size": (_wrong_size, f"tensor '{NORM}' has data_offsets [{{norm0}}, {{norm1}}] (128 bytes), but shape [63] of F16 "
                          "needs 126 bytes"),
    "metadata not str": (_metadata({"format": 1}),
                         "the safetensors header's __metadata__ entry 'format' is 1, not a string"),
    "metadata not dict": (_metadata(["pt"]), "the safetensors header's __metadata__ is not an object of strings"),
    "trailing bytes": (_trailing, "has 3 bytes after its last tensor"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_headers_are_refused_before_any_stage(model, tmp_path, capsys, case):
    damage, expected = HEADER_CASES[case]
    f = model / "model.safetensors"
    tensors = load_file(f)
    header, data = damage(tensors)
    write_raw(f, header, data)
    norm0, norm1 = raw_layout(tensors)[0][NORM]["data_offsets"]
    k = ", ".join(map(str, raw_layout({n: t for n, t in tensors.items() if n != V1})[0][K1]["data_offsets"]))
    err = refused(capsys, tmp_path, model)
    assert err.startswith(f"error: {f}"), err
    assert expected.format(k=k, norm0=norm0, norm1=norm1, norm0_plus_2=norm0 + 2) in err
    assert "fetch it again" in err
    assert library_refuses(f)  # our rule is the format's: its own reader refuses the file too


def test_duplicate_tensor_name_in_the_header_is_refused(model, tmp_path, capsys):
    f = model / "model.safetensors"
    header, data = raw_layout(load_file(f))
    text = json.dumps(header)
    # the same name again, pointing at k_proj's bytes: json.loads alone would keep the last one silently
    text = text[:-1] + f', "{NORM}": ' + json.dumps(header[K1]) + "}"
    write_raw(f, text, data)
    err = refused(capsys, tmp_path, model, command="plan")
    assert err == f"error: {f}: the safetensors header names '{NORM}' twice; the file is corrupt — fetch it again"


def test_header_that_is_not_an_object_is_refused(model, tmp_path, capsys):
    f = model / "model.safetensors"
    write_raw(f, "[1, 2, 3]", b"")
    err = refused(capsys, tmp_path, model)
    assert err == (f"error: {f}: the safetensors header is a JSON list, not an object; the file is corrupt — "
                   "fetch it again")
    assert library_refuses(f)


def test_absurd_header_length_is_refused(model, tmp_path, capsys):
    f = model / "model.safetensors"
    write_raw(f, "{}", b"", length=100_000_001)  # one byte over the library's MAX_HEADER_SIZE
    err = refused(capsys, tmp_path, model)
    assert err == (f"error: {f} is not a valid safetensors file (header length 100000001 exceeds the format's "
                   "limit of 100000000 bytes); fetch this file again")


def test_header_dtype_table_matches_the_readers(model):
    from recipe_runner.hf.safetensors_header import DTYPES
    from recipe_runner.io.safetensors_writer import CODE_TO_DTYPE

    assert {code: (dt.itemsize, str(dt)) for code, dt in CODE_TO_DTYPE.items()} == DTYPES


# ---- index files -----------------------------------------------------------------------------

def _edit_index(model: Path, edit: Callable[[dict], None], name: str = "model.safetensors.index.json") -> Path:
    path = model / name
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return path


def _first_entry(index: dict) -> tuple[str, str]:
    name = sorted(index["weight_map"])[0]
    return name, index["weight_map"][name]


def test_index_shard_outside_the_model_directory_is_refused(sharded, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    state: dict[str, str] = {}

    def edit(index):
        name, shard = _first_entry(index)
        shutil.copy(sharded / shard, outside / shard)  # a real, readable shard: only where it lies is wrong
        index["weight_map"][name] = state["shard"] = str(outside / shard)
        state["name"] = name

    path = _edit_index(sharded, edit)
    err = refused(capsys, tmp_path, sharded)
    assert err == (f"error: {path}: weight_map entry '{state['name']}' names shard '{state['shard']}', which is "
                   f"outside {sharded}; shards must be plain file names in the model directory — fix or fetch the "
                   "index file again")


def test_index_shard_with_dotdot_is_refused(sharded, tmp_path, capsys):
    state: dict[str, str] = {}

    def edit(index):
        name, shard = _first_entry(index)
        index["weight_map"][name] = state["shard"] = f"../{sharded.name}/{shard}"  # resolves to the real file
        state["name"] = name

    path = _edit_index(sharded, edit)
    err = refused(capsys, tmp_path, sharded, command="plan")
    assert f"error: {path}: weight_map entry '{state['name']}' names shard '{state['shard']}', which is outside" in err


def test_index_shard_symlinked_out_of_the_model_directory_is_refused(sharded, tmp_path, capsys):
    secret = tmp_path / "secret.safetensors"
    state: dict[str, str] = {}

    def edit(index):
        name, shard = _first_entry(index)
        shutil.copy(sharded / shard, secret)
        (sharded / "link.safetensors").symlink_to(secret)
        index["weight_map"][name] = "link.safetensors"
        state["name"] = name

    path = _edit_index(sharded, edit)
    err = refused(capsys, tmp_path, sharded)
    assert err == (f"error: {path}: weight_map entry '{state['name']}' names shard 'link.safetensors', a symlink to "
                   f"{secret.resolve()} outside {sharded}; copy the shard into the model directory")


def test_index_shard_symlinked_inside_the_model_directory_is_fine(sharded, tmp_path, capsys):
    def edit(index):
        name, shard = _first_entry(index)
        (sharded / "sub").mkdir()
        (sharded / "sub" / "same.safetensors").symlink_to(sharded / shard)
        index["weight_map"] = {n: ("sub/same.safetensors" if s == shard else s) for n, s in index["weight_map"].items()}

    _edit_index(sharded, edit)
    code, out, err = run_cli(capsys, "plan", str(recipe_for(tmp_path, sharded)), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err


@pytest.mark.parametrize("value, expected", [
    (123, "weight_map entry '{name}' is 123, not a shard file name"),
    (None, "weight_map entry '{name}' is None, not a shard file name"),
])
def test_index_entry_that_is_not_a_file_name_is_refused(sharded, tmp_path, capsys, value, expected):
    state: dict[str, str] = {}

    def edit(index):
        state["name"] = _first_entry(index)[0]
        index["weight_map"][state["name"]] = value

    path = _edit_index(sharded, edit)
    err = refused(capsys, tmp_path, sharded)
    assert err == f"error: {path}: " + expected.format(**state) + "; fetch the index file again"


def test_index_weight_map_that_is_not_an_object_is_refused(sharded, tmp_path, capsys):
    path = _edit_index(sharded, lambda index: index.update(weight_map=sorted(index["weight_map"])))
    err = refused(capsys, tmp_path, sharded)
    assert err == f"error: {path} is not a valid index file (needs a 'weight_map' object); fetch it again"


def test_index_naming_a_tensor_twice_is_refused(sharded, tmp_path, capsys):
    path = sharded / "model.safetensors.index.json"
    text = path.read_text()
    index = json.loads(text)
    name, shard = _first_entry(index)
    path.write_text(text.rstrip()[:-1].rstrip()[:-1] + f', "{name}": "{shard}"}}}}')  # inside weight_map
    assert json.loads(path.read_text())["weight_map"][name] == shard  # Python's json would accept it
    err = refused(capsys, tmp_path, sharded)
    assert err == f"error: {path} names '{name}' twice; fetch the index file again"


def test_index_listing_a_missing_shard_is_refused(sharded, tmp_path, capsys):
    path = _edit_index(sharded, lambda index: index["weight_map"].update({NORM: "model-09-of-09.safetensors"}))
    err = refused(capsys, tmp_path, sharded)
    assert err == (f"error: {path} maps tensor '{NORM}' to shard 'model-09-of-09.safetensors', which is missing "
                   f"from {sharded}; download all shards listed in the index")


def test_bin_index_shard_outside_the_model_directory_is_refused(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("bin"), model)
    names = torch.load(model / "pytorch_model.bin", weights_only=True)
    index = model / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {n: "../model/pytorch_model.bin" for n in names}}))
    err = refused(capsys, tmp_path, model)
    assert err.startswith(f"error: {index}: weight_map entry '") and "names shard '../model/pytorch_model.bin', " \
        f"which is outside {model}" in err


# ---- config.json -------------------------------------------------------------------------------

def _set_config(model: Path, **changes: Any) -> Path:
    """Set config.json keys; None removes a key."""
    path = model / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    path.write_text(json.dumps(config))  # json.dumps writes float("nan") as NaN, as transformers would
    return path


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "must hold a JSON object, but holds a JSON array"),
    ("42", "must hold a JSON object, but holds a JSON number"),
])
def test_config_that_is_not_an_object_is_refused(model, tmp_path, capsys, text, expected):
    (model / "config.json").write_text(text)
    err = refused(capsys, tmp_path, model)
    assert err == f"error: {model / 'config.json'}: {expected}; fetch the model's config.json again"


@pytest.mark.parametrize("changes, expected", [
    ({"rms_norm_eps": float("nan")}, "holds NaN, which is not JSON (write a finite number)"),
    ({"rope_parameters": {"rope_theta": float("inf"), "rope_type": "default"}},
     "holds Infinity, which is not JSON (write a finite number)"),
    ({"rms_norm_eps": 0}, "'rms_norm_eps' must be a finite number greater than 0, got 0"),
    ({"rope_parameters": {"rope_theta": -10000.0, "rope_type": "default"}},
     "'rope_theta' must be a finite number greater than 0, got -10000.0"),
    ({"rope_parameters": None, "rope_theta": 0}, "'rope_theta' must be a finite number greater than 0, got 0"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": -2.0}},
     "rope scaling 'linear' needs a finite 'factor' greater than 0, got -2.0"),
    ({"hidden_size": 0}, "'hidden_size' must be a positive integer, got 0"),
    ({"vocab_size": "1001"}, "'vocab_size' must be a positive integer, got '1001'"),
    ({"max_position_embeddings": -1}, "'max_position_embeddings' must be a positive integer, got -1"),
    ({"head_dim": 0}, "'head_dim' must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    ({"hidden_size": 60, "head_dim": None}, "hidden_size=60 is not divisible by num_attention_heads=8 and no head_dim is given"),
])
def test_bad_config_numbers_are_refused(model, tmp_path, capsys, changes, expected):
    path = _set_config(model, **changes)
    err = refused(capsys, tmp_path, model)
    assert err.startswith(f"error: {path}: {expected}"), err


@pytest.mark.parametrize("layers", [3, 5])
def test_config_layer_count_must_match_the_weights(model, tmp_path, capsys, layers):
    # 3: the fourth layer would be dropped silently; 5: the weights lack a layer
    path = _set_config(model, num_hidden_layers=layers)
    err = refused(capsys, tmp_path, model)
    assert err == (f"error: {path}: num_hidden_layers is {layers}, but model.safetensors hold(s) 4 decoder layers "
                   "(model.layers.0 to model.layers.3); config.json and the weights must come from the same model "
                   "— fetch the matching files")


def test_layer_count_is_checked_for_bin_sources_when_they_are_opened(tiny_model, copy_model):
    from recipe_runner.errors import SourceModelError
    from recipe_runner.hf.config import read_model_config
    from recipe_runner.hf.reader import SourceCheckpoint

    model = copy_model(tiny_model("bin"))
    _set_config(model, num_hidden_layers=2)
    with pytest.raises(SourceModelError, match=r"num_hidden_layers is 2, but pytorch_model.bin hold\(s\) 4 decoder"):
        SourceCheckpoint(model).validate(read_model_config(model))


# ---- remote code -------------------------------------------------------------------------------

MARKER_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("custom tokenizer code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture
def remote_code_model(tiny_model, tmp_path) -> tuple[Path, Path]:
    """(model dir whose tokenizer_config.json maps AutoTokenizer to tok.py, the file tok.py writes on import)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model(**QUANT_MODEL), model)
    marker = tmp_path / "MARKER"
    (model / "tok.py").write_text(MARKER_CODE.format(marker=str(marker)))
    path = model / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["auto_map"] = {"AutoTokenizer": [None, "tok.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    path.write_text(json.dumps(config))
    return model, marker


def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv], input="y\n", capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


def test_the_marker_would_show_custom_code_running(remote_code_model, tmp_path):
    # control: allowed explicitly, transformers does import tok.py, so the marker can catch it
    model, marker = remote_code_model
    code = ("from pathlib import Path\nfrom recipe_runner.calibration.tokens import load_tokenizer\n"
            f"try:\n    load_tokenizer(Path({str(model)!r}), trust_remote_code=True)\nexcept Exception:\n    pass\n")
    _run(tmp_path, "-c", code)
    assert marker.read_text() == "custom tokenizer code ran"


def test_build_refuses_a_tokenizer_auto_map_even_when_stdin_says_yes(remote_code_model, tmp_path, calib_file):
    model, marker = remote_code_model
    recipe = recipe_for(tmp_path, model, f"quantization:\n  algo: fp8\n  calibration: {{dataset: {calib_file}}}\n")
    proc = _run(tmp_path, "-m", "recipe_runner.cli", "build", str(recipe), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (f"source.trust_remote_code: {model / 'tokenizer_config.json'} asks for custom code "
            "(auto_map: ['AutoTokenizer']); review that code, then set source.trust_remote_code: true") in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_verify_refuses_a_tokenizer_auto_map_before_loading_anything(remote_code_model, tmp_path):
    model, marker = remote_code_model
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    proc = _run(tmp_path, "-m", "recipe_runner.cli", "verify", str(ckpt), "--source", str(model),
                "--prompt", "hello world")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{model / 'tokenizer_config.json'} asks for custom code (auto_map: ['AutoTokenizer'])" in proc.stderr
    assert "source.trust_remote_code: true" in proc.stderr
    assert not marker.exists()


def test_loaders_refuse_auto_map_unless_allowed(remote_code_model):
    from recipe_runner.calibration.runner import hf_config
    from recipe_runner.calibration.tokens import load_tokenizer
    from recipe_runner.errors import SourceModelError
    from recipe_runner.reference.hf_model import HFLayerwiseModel

    model, marker = remote_code_model
    for load in (load_tokenizer, hf_config, HFLayerwiseModel):
        with pytest.raises(SourceModelError, match="tokenizer_config.json asks for custom code"):
            load(model)
    assert not marker.exists()


@pytest.mark.parametrize("file", ["generation_config.json", "preprocessor_config.json", "config.json"])
def test_auto_map_in_any_json_file_is_refused_at_plan_time(model, tmp_path, capsys, file):
    path = model / file
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["auto_map"] = {"AutoConfig": "custom.Config"}
    path.write_text(json.dumps(data))
    err = refused(capsys, tmp_path, model, command="plan")
    assert f"source.trust_remote_code: {path} asks for custom code (auto_map: ['AutoConfig'])" in err


def test_trust_remote_code_lets_the_plan_through(remote_code_model, tmp_path, capsys):
    model, marker = remote_code_model
    recipe = recipe_for(tmp_path, model, "")
    recipe.write_text(recipe.read_text().replace(f"  path: {model}\n", f"  path: {model}\n  trust_remote_code: true\n"))
    code, out, err = run_cli(capsys, "plan", str(recipe), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert not marker.exists()  # planning runs no model code either


def test_hub_cache_snapshot_whose_shards_link_to_its_blobs_is_fine(tiny_model, tmp_path, capsys):
    # the Hugging Face hub cache keeps every file of a snapshot as a symlink to ../../blobs/<sha>
    repo = tmp_path / "models--acme--tiny"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny_model("sharded").iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    code, out, err = run_cli(capsys, "plan", str(recipe_for(tmp_path, snapshot)), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
