"""recipe.lock: byte-stable JSON, and a recheck of the output directory against it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recipe_runner.errors import UserError
from recipe_runner.store.hashing import FileDigest
from recipe_runner.store.lock import (LOCK_NAME, LockFile, compare_outputs, hash_outputs, read_lock, tool_versions,
                                verify_lock, write_lock)

OUTPUT = {"checkpoint/config.json": b'{"architecture": "LlamaForCausalLM"}',
          "checkpoint/rank0.safetensors": b"\x00" * 256, "checkpoint/rank1.safetensors": b"\x01" * 256}


def digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_output(root: Path) -> Path:
    for name, data in OUTPUT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def sample_lock(outputs: dict) -> LockFile:
    return LockFile(
        recipe_name="llama-tiny", recipe_path="recipes/tiny.yaml", recipe_sha256="ab" * 32,
        tools={"torch": "2.3.0", "python": "3.11.7"},
        sources={"model.safetensors": FileDigest(10, "cd" * 32), "config.json": {"size": 2, "sha256": "ef" * 32}},
        stages=[{"name": "convert", "key": "11" * 32}, {"name": "shard", "key": "22" * 32}],
        outputs=outputs,
    )


def test_round_trip_is_byte_stable(tmp_path):
    lock = sample_lock({name: digest(data) for name, data in OUTPUT.items()})
    text = lock.to_json()
    assert text.endswith("}\n") and text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    data = json.loads(text)
    assert data["lock_version"] == 1
    assert data["recipe"] == {"name": "llama-tiny", "path": "recipes/tiny.yaml", "sha256": "ab" * 32}
    assert list(data["sources"]) == ["config.json", "model.safetensors"]
    assert [s["name"] for s in data["stages"]] == ["convert", "shard"]  # run order, not sorted

    write_lock(tmp_path / LOCK_NAME, lock)
    assert (tmp_path / LOCK_NAME).read_text() == text
    again = read_lock(tmp_path / LOCK_NAME)
    assert again.to_json() == text
    write_lock(tmp_path / LOCK_NAME, again)
    assert (tmp_path / LOCK_NAME).read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # no temp file left behind


def test_hash_outputs_excludes_the_lock(tmp_path):
    out = make_output(tmp_path / "out")
    (out / LOCK_NAME).write_text("{}")
    assert hash_outputs(out) == {name: digest(data) for name, data in sorted(OUTPUT.items())}


def test_verify_lock_passes_then_names_a_modified_byte(tmp_path):
    out = make_output(tmp_path / "out")
    write_lock(out / LOCK_NAME, sample_lock(hash_outputs(out)))
    assert verify_lock(out / LOCK_NAME) == []

    with open(out / "checkpoint/rank1.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x02")
    problems = verify_lock(out / LOCK_NAME)
    assert len(problems) == 1
    assert problems[0].startswith("checkpoint/rank1.safetensors: content differs")


def test_missing_extra_and_resized_files_are_reported(tmp_path):
    out = make_output(tmp_path / "out")
    write_lock(out / LOCK_NAME, sample_lock(hash_outputs(out)))
    (out / "checkpoint/rank0.safetensors").unlink()
    (out / "checkpoint/config.json").write_bytes(b"{}")
    (out / "notes.txt").write_text("hello")
    assert verify_lock(out / LOCK_NAME) == [
        "checkpoint/config.json: size 2 bytes, the lock says 36",
        "checkpoint/rank0.safetensors: missing (the lock expects 256 bytes)",
        "notes.txt: extra file, not in the lock",
    ]


def test_compare_outputs_accepts_file_digests():
    same = {"a": FileDigest(1, "00" * 32)}
    assert compare_outputs(same, {"a": {"size": 1, "sha256": "00" * 32}}) == []


def test_read_lock_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path}/missing.lock: no lock file here"):
        read_lock(tmp_path / "missing.lock")
    (tmp_path / "bad.lock").write_text("{ truncated")
    with pytest.raises(UserError, match=rf"{tmp_path}/bad.lock: corrupt lock file"):
        read_lock(tmp_path / "bad.lock")
    (tmp_path / "v9.lock").write_text(json.dumps({"lock_version": 9}))
    with pytest.raises(UserError, match="lock_version 9"):
        read_lock(tmp_path / "v9.lock")
    broken = json.loads(sample_lock({}).to_json())
    del broken["outputs"]
    (tmp_path / "partial.lock").write_text(json.dumps(broken))
    with pytest.raises(UserError, match="outputs: expected a dict"):
        verify_lock(tmp_path / "partial.lock")


def test_tool_versions():
    versions = tool_versions()
    assert {"python", "recipe_runner", "torch", "transformers", "safetensors"} <= set(versions)
    assert all(isinstance(v, str) and v for v in versions.values())
    versions["torch"] = "changed"
    assert tool_versions()["torch"] != "changed"  # callers get their own copy


CALIBRATION = {"dataset": "acme/calib", "revision": "a" * 40,
               "files": {"data/train.jsonl": {"size": 5, "sha256": "12" * 32}}}
TOKENIZER = {"tokenizer.json": {"size": 3, "sha256": "34" * 32}}


def test_input_sections_round_trip_and_are_checked(tmp_path):
    import dataclasses

    lock = dataclasses.replace(sample_lock({}), tokenizer=TOKENIZER, calibration=CALIBRATION)
    data = json.loads(lock.to_json())
    assert data["calibration"] == CALIBRATION and data["tokenizer"] == TOKENIZER
    assert "calibration" not in json.loads(sample_lock({}).to_json())  # a plan that reads none
    write_lock(tmp_path / LOCK_NAME, lock)
    assert read_lock(tmp_path / LOCK_NAME).to_json() == lock.to_json()
    assert read_lock(tmp_path / LOCK_NAME).calibration == CALIBRATION
    broken = {**data, "calibration": {"dataset": "acme/calib", "files": {"x": {"size": 1}}}}
    (tmp_path / "bad.lock").write_text(json.dumps(broken))
    with pytest.raises(UserError, match=r"corrupt lock file \(x: expected \{size, sha256\}"):
        read_lock(tmp_path / "bad.lock")


def test_compare_inputs_names_each_differing_input():
    import dataclasses

    from recipe_runner.store.lock import compare_inputs

    lock = dataclasses.replace(sample_lock({}), tokenizer=TOKENIZER, calibration=CALIBRATION)
    sources = {"model.safetensors": {"size": 10, "sha256": "cd" * 32}, "config.json": {"size": 2, "sha256": "ef" * 32}}
    assert compare_inputs(lock, sources, TOKENIZER, CALIBRATION) == []
    moved = {"dataset": "acme/calib", "revision": "b" * 40,
             "files": {"data/train.jsonl": {"size": 5, "sha256": "56" * 32}, "data/extra.jsonl": {"size": 1, "sha256": "78" * 32}}}
    assert compare_inputs(lock, {**sources, "config.json": {"size": 3, "sha256": "ef" * 32}}, {}, moved) == [
        "source config.json: size 3 bytes, the lock says 2",
        "tokenizer tokenizer.json: missing (the lock expects 3 bytes)",
        f"calibration revision {'b' * 40}, the lock says {'a' * 40}",
        "calibration data/extra.jsonl: extra file, not in the lock",
        f"calibration data/train.jsonl: content differs (sha256 {'56' * 6}..., the lock says {'12' * 6}...)",
    ]
    local = {"dataset": "calib.txt", "files": {"calib.txt": {"size": 5, "sha256": "12" * 32}}}
    assert compare_inputs(lock, sources, None, local)[:2] == [
        "calibration dataset 'calib.txt', the lock says 'acme/calib'",
        f"calibration revision (a local file), the lock says {'a' * 40}"]
    earlier = sample_lock({})  # written before the lock listed tokenizer and calibration files
    assert compare_inputs(earlier, sources, TOKENIZER, None) == [
        "tokenizer: the lock records no tokenizer files (an earlier recipe-runner wrote it); build without "
        "--locked once to write a lock that pins them"]
