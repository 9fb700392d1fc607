"""`recipe build` end to end: caching, reruns per field, lock files, concurrency, crashes, corruption."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe_runner.pipeline.build import run_build
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.lock import read_lock
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from recipe_runner.pipeline.resolve import resolve
from tests.conftest import load_hf_tensors, reassemble
from tests.recipe_files import run_cli

RECIPE = """\
recipe_version: 1
name: tiny
description: a tiny model
source:
  path: {model}
  dtype: {dtype}
mapping:
  tp_size: {tp}
  pp_size: 1
output:
  dir: {out}
workers: {workers}
"""


def write_recipe(directory: Path, model: Path, *, tp=2, dtype="auto", out="out", workers=1,
                 description="a tiny model", name="r.yaml") -> Path:
    path = directory / name
    text = RECIPE.format(model=model, tp=tp, dtype=dtype, out=out, workers=workers)
    path.write_text(text.replace("a tiny model", description))
    return path


def build(recipe_path: Path, store: CacheStore, **kwargs):
    return run_build(make_plan(load_recipe(recipe_path)), store=store, echo=lambda _: None, **kwargs)


def actions(result) -> dict[str, str]:
    return {t["stage"]: t["action"] for t in result.trace}


@pytest.fixture
def store(tmp_path) -> CacheStore:
    return CacheStore(tmp_path / "cache")


def test_second_build_runs_no_stage(tiny_model, tmp_path, store):
    recipe = write_recipe(tmp_path, tiny_model("gqa"))
    assert actions(build(recipe, store)) == {"convert": "ran", "shard": "ran"}
    second = build(recipe, store)
    assert actions(second) == {"convert": "cached", "shard": "cached"}
    lock = read_lock(second.lock_path)
    assert sorted(lock.outputs) == ["checkpoint/config.json"] + [f"checkpoint/rank{r}.safetensors" for r in range(2)]


@pytest.mark.parametrize("change, expected", [
    ({"tp": 4}, {"convert": "cached", "shard": "ran"}),
    ({"dtype": "float32"}, {"convert": "ran", "shard": "ran"}),
    ({"description": "edited text"}, {"convert": "cached", "shard": "cached"}),
    ({"workers": 2}, {"convert": "cached", "shard": "cached"}),
    ({"out": "elsewhere"}, {"convert": "cached", "shard": "cached"}),
])
def test_each_field_change_reruns_exactly_its_stages(tiny_model, tmp_path, store, change, expected):
    model = tiny_model("gqa")
    build(write_recipe(tmp_path, model), store)
    assert actions(build(write_recipe(tmp_path, model, **change), store)) == expected


def test_changed_source_file_reruns_convert_and_shard(tiny_model, copy_model, tmp_path, store):
    model = copy_model(tiny_model("gqa"))
    recipe = write_recipe(tmp_path, model)
    build(recipe, store)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(config))
    assert actions(build(recipe, store)) == {"convert": "ran", "shard": "ran"}


def test_plan_explains_why_a_stage_must_run(tiny_model, tmp_path, store, capsys):
    model = tiny_model("gqa")
    build(write_recipe(tmp_path, model), store)
    recipe = write_recipe(tmp_path, model, tp=4)
    code, out, err = run_cli(capsys, "plan", str(recipe), "--cache-dir", str(store.root), "--format", "json")
    assert code == 0, err
    stages = {s["name"]: s for s in json.loads(out)["recipes"][0]["stages"]}
    assert stages["convert"]["cached"] is True and stages["convert"]["reasons"] == []
    assert stages["shard"]["cached"] is False
    assert stages["shard"]["reasons"] == ["recipe tp_size: 2 -> 4"]
    code, out, _ = run_cli(capsys, "plan", str(recipe), "--cache-dir", str(store.root))
    assert "missing: recipe tp_size: 2 -> 4" in out and "cached" in out


def test_locked_rebuild_is_bit_identical_and_tampering_is_named(tiny_model, tmp_path, store, capsys):
    recipe = write_recipe(tmp_path, tiny_model("gqa"))
    first = build(recipe, store)
    lock_path = first.lock_path
    code, out, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(store.root), "--locked", str(lock_path))
    assert code == 0, err
    assert "2 stage(s) run, 0 cached" in out and "bit-identical" in out  # rebuilt, not taken from the cache

    code, out, _ = run_cli(capsys, "verify-lock", str(lock_path))
    assert code == 0 and "every output file matches" in out
    rank1 = first.output_dir / "checkpoint" / "rank1.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-1] ^= 0xFF
    rank1.chmod(0o644)
    rank1.unlink()  # published files are hardlinks into the read-only cache: replace, don't edit
    rank1.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "verify-lock", str(lock_path))
    assert code == 1 and "checkpoint/rank1.safetensors" in err and "checkpoint/rank0" not in err

    lock = json.loads(lock_path.read_text())
    lock["outputs"]["checkpoint/rank0.safetensors"]["sha256"] = "0" * 64
    bad_lock = tmp_path / "bad.lock"
    bad_lock.write_text(json.dumps(lock))
    code, _, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(store.root), "--locked", str(bad_lock))
    assert code == 2
    assert "not bit-identical" in err and "checkpoint/rank0.safetensors" in err


def test_locked_rebuild_refuses_another_recipe(tiny_model, tmp_path, store, capsys):
    model = tiny_model("gqa")
    lock_path = build(write_recipe(tmp_path, model), store).lock_path
    other = write_recipe(tmp_path, model, tp=4, name="other.yaml")
    code, _, err = run_cli(capsys, "build", str(other), "--cache-dir", str(store.root), "--locked", str(lock_path))
    assert code == 2 and "is not the locked recipe" in err


def test_worker_count_gives_identical_outputs(tiny_model, tmp_path):
    model = tiny_model("gqa")
    one = build(write_recipe(tmp_path, model, tp=4, out="one"), CacheStore(tmp_path / "c1"))
    two = build(write_recipe(tmp_path, model, tp=4, out="two", workers=2), CacheStore(tmp_path / "c2"))
    assert read_lock(one.lock_path).outputs == read_lock(two.lock_path).outputs
    assert read_lock(one.lock_path).stages == read_lock(two.lock_path).stages


def _cli(recipe: Path, cache: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipe_runner.cli", "build", str(recipe), "--cache-dir", str(cache),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_builds_share_one_entry_per_stage(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model("gqa"))
    cache = tmp_path / "cache"
    procs = [_cli(recipe, cache) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    runs = sum(out.count("running (") for out, _ in results)
    assert runs == 2  # convert and shard each ran once, in one of the two processes
    assert len(list((cache / "entries").glob("*/*"))) == 2
    assert subprocess.run([sys.executable, "-m", "recipe_runner.cli", "verify-lock",
                           str(tmp_path / "out" / "recipe.lock")]).returncode == 0


def test_build_killed_mid_stage_then_rerun_is_correct(tiny_model, tmp_path):
    model = tiny_model("gqa", hidden_size=512, intermediate_size=2048, num_hidden_layers=6, vocab_size=8000)
    recipe = write_recipe(tmp_path, model, tp=2)
    cache = tmp_path / "cache"
    shard_key = resolve(make_plan(load_recipe(recipe)), CacheStore(cache)).status("shard").key.digest
    proc = _cli(recipe, cache)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _writing_ranks(cache, shard_key):
        time.sleep(0.002)
    assert _writing_ranks(cache, shard_key), "the shard stage never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "recipe.lock").exists()
    shard_entries = [p for p in (cache / "entries").glob("*/*") if json.loads((p / "manifest.json").read_text())["stage"] == "shard"]
    assert shard_entries == []
    rerun = _cli(recipe, cache)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    original = reassemble(tmp_path / "out" / "checkpoint")
    hf = load_hf_tensors(model)
    assert all(original[name].equal(hf[name]) for name in hf)


def _writing_ranks(cache: Path, key: str) -> bool:
    """True once the stage with `key` has begun writing rank files in its temp dir."""
    return any(p.stat().st_size > 0 for d in cache.glob(f"tmp/{key}.*") for p in d.rglob("rank*"))


def test_corrupted_cache_entry_is_quarantined_and_not_reused(tiny_model, tmp_path, store, capsys):
    recipe = write_recipe(tmp_path, tiny_model("gqa"))
    build(recipe, store)
    shard = next(p for p in (store.root / "entries").glob("*/*")
                 if json.loads((p / "manifest.json").read_text())["stage"] == "shard")
    victim = shard / "data" / "rank0.safetensors"
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "cache", "verify", "--cache-dir", str(store.root))
    assert code == 1 and f"CORRUPT {shard.name[:12]}" in err
    assert actions(build(recipe, store)) == {"convert": "cached", "shard": "ran"}
    code, out, _ = run_cli(capsys, "verify-lock", str(tmp_path / "out" / "recipe.lock"))
    assert code == 0, out


def test_cache_ls_and_gc_from_the_command_line(tiny_model, tmp_path, store, capsys):
    recipe = write_recipe(tmp_path, tiny_model("gqa"))
    build(recipe, store)
    code, out, _ = run_cli(capsys, "cache", "ls", "--cache-dir", str(store.root))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3 and {line.split()[1] for line in lines[:2]} == {"convert", "shard"}
    assert lines[-1].startswith("2 entries") and "tiny" in lines[0]
    code, _, err = run_cli(capsys, "cache", "gc", "--cache-dir", str(store.root))
    assert code == 2 and "give --max-size SIZE and/or --older-than DAYS" in err
    code, out, _ = run_cli(capsys, "cache", "gc", "--max-size", "1K", "--cache-dir", str(store.root))
    assert code == 0 and out.strip().splitlines()[-1].startswith("removed 2 entries, ")
    assert actions(build(recipe, store)) == {"convert": "ran", "shard": "ran"}


def test_warm_no_op_build_never_imports_torch(tiny_model, tmp_path, store):
    recipe = write_recipe(tmp_path, tiny_model("gqa"))
    recipe.write_text(recipe.read_text() + "verify:\n  token_ids: [[1, 2, 3, 4]]\n")  # publishing names its reports
    build(recipe, store)
    code = ("import sys\nfrom recipe_runner.cli import main\n"
            f"try:\n    main(['build', {str(recipe)!r}, '--cache-dir', {str(store.root)!r}])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('torch imported' if 'torch' in sys.modules else 'torch not imported')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0 stage(s) run, 3 cached" in proc.stdout
    assert proc.stdout.strip().endswith("torch not imported")  # importing torch alone costs ~1 s
