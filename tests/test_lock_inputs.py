"""The lock pins every input: the source, tokenizer and calibration files (an HF-cache dataset with
the snapshot used); `--locked` and `verify-lock --recipe` name what changed; `plan` says which file."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from recipe_runner.pipeline.build import run_build
from recipe_runner.pipeline.keys import explain_change
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.pipeline.progress import format_size
from recipe_runner.pipeline.resolve import resolve
from recipe_runner.recipe import load_recipe
from recipe_runner.store.cache import CacheStore
from tests.conftest import calibration_texts
from tests.recipe_files import run_cli

REV_A, REV_B = "a" * 40, "0123456789abcdef0123456789abcdef0123456b"
RECIPE = """\
recipe_version: 1
name: pinned
source:
  path: {model}
  dtype: float16
mapping:
  tp_size: 1
quantization:
  algo: fp8
  calibration:
    dataset: {dataset}
    num_samples: 4
    max_seq_len: 16
    batch_size: 4{revision}
output:
  dir: out
"""


def digest(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def write_recipe(tmp_path: Path, model: Path, dataset: str = "acme/calib", revision: str | None = None) -> Path:
    path = tmp_path / "pinned.yaml"
    pin = f"\n    revision: {revision}" if revision else ""
    path.write_text(RECIPE.format(model=model, dataset=dataset, revision=pin))
    return path


def snapshot(hub: Path, revision: str, texts: list[str], *, main: bool = True) -> Path:
    """A dataset snapshot laid out as huggingface_hub caches it (refs/main names the commit)."""
    repo = hub / "datasets--acme--calib"
    data = repo / "snapshots" / revision / "data" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return data


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def model(quant_model, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(quant_model, copy)
    return copy


def test_lock_lists_tokenizer_and_calibration_files_and_the_snapshot_used(model, hub, tmp_path, capsys):
    data = snapshot(hub, REV_A, calibration_texts())
    recipe = write_recipe(tmp_path, model)
    store = CacheStore(tmp_path / "cache")
    result = run_build(make_plan(load_recipe(recipe)), store=store, echo=lambda _: None)
    lock = json.loads(result.lock_path.read_text())
    assert lock["calibration"] == {"dataset": "acme/calib", "revision": REV_A,
                                   "files": {"data/train.jsonl": digest(data)}}
    names = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                         "added_tokens.json", "vocab.json", "merges.txt") if (model / n).is_file()]
    assert names and lock["tokenizer"] == {n: digest(model / n) for n in sorted(names)}
    assert lock["sources"]["config.json"] == digest(model / "config.json")

    code, out, err = run_cli(capsys, "verify-lock", str(result.lock_path), "--recipe", str(recipe),
                             "--cache-dir", str(store.root))
    assert code == 0, err
    assert "every output file matches and every input file" in out

    # refs/main moves to another commit whose file differs: the lock names the snapshot and the file
    moved = snapshot(hub, REV_B, calibration_texts()[:5])
    tokenizer = model / names[0]
    tokenizer.write_bytes(tokenizer.read_bytes() + b"\n")
    code, _, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(store.root), "--locked",
                           str(result.lock_path))
    assert code == 2, err
    old, new = digest(data), digest(moved)
    assert err.splitlines()[-3:] == [
        f"  tokenizer {names[0]}: size {digest(tokenizer)['size']} bytes, the lock says {lock['tokenizer'][names[0]]['size']}",
        f"  calibration revision {REV_B}, the lock says {REV_A}",
        f"  calibration data/train.jsonl: size {new['size']} bytes, the lock says {old['size']}",
    ]
    assert "cannot rebuild from the lock file:" in err
    code, _, err = run_cli(capsys, "verify-lock", str(result.lock_path), "--recipe", str(recipe),
                           "--cache-dir", str(store.root))
    assert code == 1
    assert f"  calibration revision {REV_B}, the lock says {REV_A}" in err.splitlines()

    # plan says which file of which input changed
    code, out, err = run_cli(capsys, "plan", str(recipe), "--cache-dir", str(store.root), "--format", "json")
    assert code == 0, err
    reasons = {s["name"]: s["reasons"] for s in json.loads(out)["recipes"][0]["stages"]}
    assert reasons["calibrate"] == [
        f"input calibration-data changed: data/train.jsonl (size {format_size(old['size'])} → "
        f"{format_size(new['size'])}, "
        f"sha256 {old['sha256'][:12]}… → {new['sha256'][:12]}…)",
        f"input tokenizer changed: {names[0]} (size {lock['tokenizer'][names[0]]['size']} B → "
        f"{digest(tokenizer)['size']} B, sha256 {lock['tokenizer'][names[0]]['sha256'][:12]}… → "
        f"{digest(tokenizer)['sha256'][:12]}…)",
    ]
    assert reasons["convert"] == []


def test_a_pinned_revision_enters_only_the_calibrate_key_and_the_lock(model, hub, tmp_path):
    snapshot(hub, REV_A, calibration_texts())
    pinned_data = snapshot(hub, REV_B, calibration_texts()[:6], main=False)  # refs/main stays at REV_A
    store = CacheStore(tmp_path / "cache")
    unpinned = resolve(make_plan(load_recipe(write_recipe(tmp_path, model))), store)
    pinned = resolve(make_plan(load_recipe(write_recipe(tmp_path, model, revision=REV_B))), store)
    assert unpinned.status("convert").key == pinned.status("convert").key
    assert pinned.status("calibrate").key.material["params"]["revision"] == REV_B
    assert "revision" not in unpinned.status("calibrate").key.material["params"]
    assert pinned.calibration.revision == REV_B and unpinned.calibration.revision == REV_A
    assert {n: d.to_dict() for n, d in pinned.calibration.files.items()} == {"data/train.jsonl": digest(pinned_data)}


def test_a_local_calibration_file_is_listed_by_name(model, tmp_path, calib_file):
    local = tmp_path / "calib.txt"
    shutil.copy(calib_file, local)
    resolved = resolve(make_plan(load_recipe(write_recipe(tmp_path, model, dataset="calib.txt"))),
                       CacheStore(tmp_path / "cache"))
    from recipe_runner.pipeline.execute import lock_inputs

    assert lock_inputs(resolved)["calibration"] == {"dataset": "calib.txt", "files": {"calib.txt": digest(local)}}
    # the key is the file's sha256, as before the lock listed it
    assert resolved.status("calibrate").key.material["inputs"]["calibration-data"] == digest(local)["sha256"]


def test_changed_source_files_are_named_with_sizes_and_digests():
    def files(**entries):
        return {n: {"size": s, "sha256": h * 64} for n, (s, h) in entries.items()}

    old = {"inputs": {"source": "s1"}}
    new = {"inputs": {"source": "s2"}}
    gb = 4_900_000_000
    before = files(**{"config.json": (10, "0"), "model-00001-of-00002.safetensors": (gb, "1"),
                      "model-00002-of-00002.safetensors": (gb, "2"), "gone.bin": (5, "5")})
    after = files(**{"config.json": (10, "0"), "model-00001-of-00002.safetensors": (gb, "1"),
                     "model-00002-of-00002.safetensors": (gb + 1, "3"), "new.json": (7, "7")})
    assert explain_change(old, new, {"s1": before}, {"s2": after}) == [
        "input source changed: gone.bin removed, "
        f"model-00002-of-00002.safetensors (size {gb} B → {gb + 1} B, sha256 {'2' * 12}… → {'3' * 12}…), "
        "new.json added"]
    after["model-00002-of-00002.safetensors"]["size"] = 2 * gb
    many = {**after, **files(**{f"extra{i}.json": (1, "9") for i in range(4)})}
    assert explain_change(old, new, {"s1": before}, {"s2": many}) == [
        "input source changed: extra0.json added, extra1.json added, extra2.json added, and 4 more"]
    assert explain_change(old, new, {"s1": before}, {"s2": after})[0].count("4.6 GiB → 9.1 GiB") == 1
    assert explain_change(old, new) == ["input source changed"]  # a record without file listings


def test_plan_names_the_changed_source_file(tiny_model, tmp_path, capsys):
    model = tmp_path / "plain"
    shutil.copytree(tiny_model("gqa"), model)
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(f"recipe_version: 1\nname: plain\nsource:\n  path: {model}\noutput:\n  dir: out\n")
    store = CacheStore(tmp_path / "cache")
    run_build(make_plan(load_recipe(recipe)), store=store, echo=lambda _: None)
    before = digest(model / "config.json")
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(config))
    after = digest(model / "config.json")
    code, out, err = run_cli(capsys, "plan", str(recipe), "--cache-dir", str(store.root), "--format", "json")
    assert code == 0, err
    reasons = {s["name"]: s["reasons"] for s in json.loads(out)["recipes"][0]["stages"]}
    assert reasons["convert"] == [
        f"input source changed: config.json (size {before['size']} B → {after['size']} B, "
        f"sha256 {before['sha256'][:12]}… → {after['sha256'][:12]}…)"]
    assert reasons["shard"] == ["input convert changed", *reasons["convert"]]  # an upstream key: no files
