"""Publishing (issue 14): ownership of the output directory, one generation at a time, copies that
never share bytes with the cache, kills at every publish step, concurrent publishes."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe_runner.store import fsutil, publish
from recipe_runner.store.fsutil import copy_tree
from tests.fake_trtllm import install_fake_toolchain
from tests.recipe_files import run_cli

RECIPE = """\
recipe_version: 1
name: {name}
source:
  path: {model}
output:
  dir: {out}
{extra}"""
VERIFY = "verify:\n  token_ids: [[1, 2, 3, 4]]\n"


def recipe(tmp_path: Path, model: Path, *, name: str = "tiny", out: str = "out", extra: str = "",
           file: str = "r.yaml") -> Path:
    path = tmp_path / file
    path.write_text(RECIPE.format(name=name, model=model, out=out, extra=extra))
    return path


def build(capsys, recipe_file: Path, cache: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "build", str(recipe_file), "--cache-dir", str(cache), *args)


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def lock_ok(capsys, out: Path) -> None:
    code, stdout, err = run_cli(capsys, "verify-lock", str(out / "recipe.lock"))
    assert code == 0, err
    assert "every output file matches" in stdout


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- ownership ----------------------------------------------------------------------------------

def test_a_directory_we_did_not_write_is_refused_before_any_stage(tiny_model, tmp_path, capsys):
    user_file = tmp_path / "out" / "checkpoint" / "important.txt"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("mine")
    code, out, err = build(capsys, recipe(tmp_path, tiny_model()), tmp_path / "cache")
    line = one_line_error(err)
    assert code == 2
    assert line.startswith(f"error: {tmp_path / 'r.yaml'}:6:8: output.dir: ")
    assert "is not empty and was not written by recipe-runner" in line and "--force" in line
    assert user_file.read_text() == "mine" and not (tmp_path / "cache" / "entries").exists()


def test_force_publishes_beside_user_files_and_never_replaces_them(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "a.txt").write_text("keep")
    (out / "README").write_text("mine")
    cache = tmp_path / "cache"
    code, _, err = build(capsys, recipe(tmp_path, tiny_model()), cache, "--force")
    assert code == 0, err
    assert (out / "notes" / "a.txt").read_text() == "keep" and (out / "README").read_text() == "mine"
    lock_ok(capsys, out)
    # a name the build needs that holds user data is refused even with --force
    (tmp_path / "out2" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out2" / "checkpoint" / "x.bin").write_bytes(b"\x01")
    code, _, err = build(capsys, recipe(tmp_path, tiny_model(), out="out2", file="r2.yaml"), cache, "--force")
    line = one_line_error(err)
    assert code == 2 and f"{tmp_path / 'out2' / 'checkpoint'} exists and was not written by recipe-runner" in line
    assert (tmp_path / "out2" / "checkpoint" / "x.bin").read_bytes() == b"\x01"
    # files a user adds beside our links later survive every rebuild
    (out / "later.txt").write_text("added")
    code, _, err = build(capsys, recipe(tmp_path, tiny_model(), extra=VERIFY), cache)
    assert code == 0, err
    assert (out / "later.txt").read_text() == "added" and (out / "verify" / "verify.json").is_file()


@pytest.mark.parametrize("case", ["source-inside", "root", "home", "cache-inside", "is-a-file"])
def test_outputs_that_overlap_what_is_not_ours_are_refused_at_plan_time(tiny_model, copy_model, tmp_path, capsys,
                                                                        monkeypatch, case):
    cache = tmp_path / "cache"
    out, model = "out", tiny_model()
    if case == "source-inside":  # the source model lives where the checkpoint would be published
        model = copy_model(tiny_model())
        os.rename(model, tmp_path / "model-at-checkpoint")
        (tmp_path / "out").mkdir()
        model = tmp_path / "out" / "checkpoint"
        os.rename(tmp_path / "model-at-checkpoint", model)
        expected = f"contains the source model ({model})"
    elif case == "root":
        out, expected = "/", "is the filesystem root"
    elif case == "home":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        out, expected = str(tmp_path / "home"), "is your home directory"
    elif case == "cache-inside":
        cache = tmp_path / "out" / "cache"
        expected = f"contains the cache ({cache})"
    else:
        (tmp_path / "out").write_text("a file")
        expected = "is a file, not a directory"
    before = tree_bytes(model)
    code, _, err = build(capsys, recipe(tmp_path, model, out=out), cache)
    line = one_line_error(err)
    assert code == 2 and expected in line and ":6:8: output.dir:" in line
    assert tree_bytes(model) == before and not (cache / "entries").exists()


def test_two_recipes_with_one_output_dir_in_one_build_are_refused(tiny_model, tmp_path, capsys):
    first = recipe(tmp_path, tiny_model(), name="a", file="a.yaml")
    second = recipe(tmp_path, tiny_model(), name="b", file="b.yaml")
    code, _, err = run_cli(capsys, "build", str(first), str(second), "--cache-dir", str(tmp_path / "cache"))
    line = one_line_error(err)
    assert code == 2 and "is also the output of recipe 'a' in this build" in line and "b.yaml:6:8" in line
    assert not (tmp_path / "out").exists()


# ---- generations --------------------------------------------------------------------------------

def test_stale_artifacts_vanish_with_their_generation(tiny_model, tmp_path, capsys, monkeypatch):
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = recipe(tmp_path, tiny_model(), extra=VERIFY + "engine: {max_seq_len: 256, max_input_len: 128}\n")
    code, _, err = build(capsys, r, cache)
    assert code == 0, err
    assert (out / "engine" / "rank0.engine").is_file() and (out / "engine" / "build.log").is_file()
    assert not (out / "logs").exists()
    lock_ok(capsys, out)  # the engine's log is part of the lock: verify-lock passes after engine builds
    code, _, err = build(capsys, r, cache, "--until", "checkpoint", "--no-verify")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".recipe-runner", "build.json", "checkpoint",
                                                      "recipe.lock"]
    assert len(list((out / ".recipe-runner" / "generations").iterdir())) == 2  # one dir and its seal
    assert sorted(json.loads((out / "recipe.lock").read_text())["outputs"]) == ["checkpoint/config.json",
                                                                                 "checkpoint/rank0.safetensors"]
    lock_ok(capsys, out)


def test_an_unchanged_rebuild_publishes_nothing(tiny_model, tmp_path, capsys):
    r, out, cache = recipe(tmp_path, tiny_model()), tmp_path / "out", tmp_path / "cache"
    assert build(capsys, r, cache)[0] == 0
    generation = os.readlink(out / ".recipe-runner" / "current")
    code, stdout, _ = build(capsys, r, cache)
    assert code == 0 and f"[publish] {out} is up to date" in stdout
    assert os.readlink(out / ".recipe-runner" / "current") == generation
    (out / ".recipe.lock.4242.0a0b0c0d.tmp").write_text("{")  # a stray temp file trips nothing
    lock_ok(capsys, out)


def test_a_byte_flipped_in_a_published_file_touches_neither_cache_nor_other_outputs(tiny_model, tmp_path, capsys):
    cache = tmp_path / "cache"
    first, second = recipe(tmp_path, tiny_model(), out="a"), recipe(tmp_path, tiny_model(), out="b", file="b.yaml")
    assert build(capsys, first, cache)[0] == 0 and build(capsys, second, cache)[0] == 0
    rank = tmp_path / "a" / "checkpoint" / "rank0.safetensors"
    good = rank.read_bytes()
    assert os.stat(rank).st_nlink == 1  # a copy, not a link into the cache
    os.chmod(rank, 0o644)
    with open(rank, "r+b") as f:  # edited in place, as an editor or a stray script would
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 0xFF]))
    assert (tmp_path / "b" / "checkpoint" / "rank0.safetensors").read_bytes() == good
    code, stdout, err = run_cli(capsys, "verify-lock", str(tmp_path / "a" / "recipe.lock"))
    assert code == 1 and "checkpoint/rank0.safetensors: content differs" in err
    assert run_cli(capsys, "cache", "verify", "--cache-dir", str(cache))[0] == 0  # the cache is intact
    code, stdout, err = build(capsys, first, cache)
    assert code == 0 and "[shard] cached" in stdout and "[publish]" in stdout and "up to date" not in stdout
    assert rank.read_bytes() == good
    lock_ok(capsys, tmp_path / "a")


def test_an_edited_cache_entry_is_rebuilt_never_republished(tiny_model, tmp_path, capsys):
    cache, r = tmp_path / "cache", recipe(tmp_path, tiny_model())
    assert build(capsys, r, cache)[0] == 0
    good = (tmp_path / "out" / "checkpoint" / "rank0.safetensors").read_bytes()
    [cached] = [p for p in (cache / "entries").rglob("rank0.safetensors")]
    os.chmod(cached, 0o644)
    with open(cached, "r+b") as f:
        f.seek(len(good) - 3)
        f.write(b"\x00\x00\x00" if good[-3:] != b"\x00\x00\x00" else b"\x01\x01\x01")
    code, stdout, err = build(capsys, r, cache)
    assert code == 0, err
    assert "[shard] running" in stdout and "is corrupt (rank0.safetensors was changed after the entry was sealed" in err
    assert (tmp_path / "out" / "checkpoint" / "rank0.safetensors").read_bytes() == good
    lock_ok(capsys, tmp_path / "out")


def test_recipes_sharing_a_verify_key_publish_reports_naming_themselves(tiny_model, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = recipe(tmp_path, tiny_model(), name="first", out="a", extra=VERIFY, file="a.yaml")
    second = recipe(tmp_path, tiny_model(), name="second", out="b", extra=VERIFY, file="b.yaml")
    assert build(capsys, first, cache)[0] == 0
    code, stdout, _ = build(capsys, second, cache)
    assert code == 0 and "[verify] cached" in stdout
    for name, out in (("first", "a"), ("second", "b")):
        report = json.loads((tmp_path / out / "verify" / "verify.json").read_text())
        assert report["recipe"]["name"] == name
        assert f"# Verification passed: {name}" in (tmp_path / out / "verify" / "verify.md").read_text()
        lock_ok(capsys, tmp_path / out)
    [cached] = list((cache / "entries").rglob("verify.json"))
    assert json.loads(cached.read_text())["recipe"] is None  # the cached bytes name no recipe
    lock = tmp_path / "b" / "recipe.lock"
    code, stdout, err = build(capsys, second, cache, "--locked", str(lock))
    assert code == 0, err
    assert "bit-identical" in stdout


# ---- kills at every publish step ------------------------------------------------------------------

KILL_POINTS = [("copy_tree", 1), ("_replace_symlink", 1), ("_replace_symlink", 2), ("OutputDir._write_marker", 2),
               ("OutputDir._prune", 1)]


# A child process runs the build and dies (no cleanup at all, like SIGKILL) at the nth call of a
# function of recipe_runner.store.publish.
KILLED_BUILD = """
import os, sys
from recipe_runner.store import publish
from recipe_runner.cli import main
point, nth = sys.argv[1], int(sys.argv[2])
owner, _, attr = point.rpartition(".")
holder = getattr(publish, owner) if owner else publish
original, calls = getattr(holder, attr), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os._exit(9)
    return original(*args, **kwargs)
setattr(holder, attr, dying)
main(sys.argv[3:])
"""


@pytest.mark.parametrize("point,nth", KILL_POINTS)
def test_a_kill_at_any_publish_step_leaves_one_whole_generation(tiny_model, tmp_path, capsys, point, nth):
    cache, out = tmp_path / "cache", tmp_path / "out"
    first = recipe(tmp_path, tiny_model())
    assert build(capsys, first, cache)[0] == 0
    before = tree_bytes(out / "checkpoint")
    changed = recipe(tmp_path, tiny_model(), extra=VERIFY + "mapping: {tp_size: 2}\n")
    child = subprocess.run([sys.executable, "-c", KILLED_BUILD, point, str(nth), "build", str(changed),
                            "--cache-dir", str(cache)], capture_output=True, text=True, timeout=120)
    assert child.returncode == 9, child.stderr
    lock_ok(capsys, out)  # whichever generation is current is whole, and its lock matches it
    published = tree_bytes(out / "checkpoint")
    assert published == before or sorted(published) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    code, _, err = build(capsys, changed, cache)  # nothing left behind trips the next build
    assert code == 0, err
    lock_ok(capsys, out)
    meta = out / ".recipe-runner"
    assert sorted(os.listdir(meta / "staging")) == [] and len(os.listdir(meta / "generations")) == 2
    assert sorted(p.name for p in out.iterdir()) == [".recipe-runner", "build.json", "checkpoint", "recipe.lock", "verify"]


# ---- concurrency and gc ---------------------------------------------------------------------------

def _cli(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipe_runner.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_concurrent_publishes_to_one_output_all_succeed(tiny_model, tmp_path, capsys):
    r = recipe(tmp_path, tiny_model(), extra=VERIFY)
    procs = [_cli("build", str(r), "--cache-dir", str(tmp_path / f"cache{i}")) for i in range(3)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0], results
    lock_ok(capsys, tmp_path / "out")
    assert len(os.listdir(tmp_path / "out" / ".recipe-runner" / "generations")) == 2


def test_gc_during_builds_leaves_them_green(tiny_model, tmp_path, capsys):
    cache = tmp_path / "cache"
    r = recipe(tmp_path, tiny_model(), extra=VERIFY + "mapping: {tp_size: 2}\n")
    assert build(capsys, r, cache)[0] == 0
    lock = tmp_path / "locked.lock"
    lock.write_bytes((tmp_path / "out" / "recipe.lock").read_bytes())
    builds = [_cli("build", str(r), "--cache-dir", str(cache), "--locked", str(lock)),
              _cli("build", str(recipe(tmp_path, tiny_model(), out="fresh", file="f.yaml", extra=VERIFY)),
                   "--cache-dir", str(cache))]
    rounds = 0
    while any(p.poll() is None for p in builds):
        gc = subprocess.run([sys.executable, "-m", "recipe_runner.cli", "cache", "gc", "--max-size", "0",
                             "--cache-dir", str(cache)], capture_output=True, text=True)
        assert gc.returncode == 0, gc.stderr
        rounds += 1
    assert rounds >= 1
    assert [(p.returncode, p.stderr.read()) for p in builds][0][0] == 0
    assert builds[1].returncode == 0
    lock_ok(capsys, tmp_path / "out")
    lock_ok(capsys, tmp_path / "fresh")


def test_gc_refuses_negative_ages_and_dry_run_removes_nothing(tiny_model, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert build(capsys, recipe(tmp_path, tiny_model()), cache)[0] == 0
    for bad in ("-1", "nan", "-inf"):
        code, _, err = run_cli(capsys, "cache", "gc", "--older-than", bad, "--cache-dir", str(cache))
        assert code == 2 and f"--older-than {float(bad)}: give a number of days >= 0" in one_line_error(err)
    code, stdout, _ = run_cli(capsys, "cache", "gc", "--max-size", "0", "--dry-run", "--cache-dir", str(cache))
    lines = stdout.strip().splitlines()
    assert code == 0 and len(lines) == 3 and lines[0].startswith("would remove ") and "shard" in stdout
    assert lines[-1].startswith("would remove 2 entries, ")
    assert len(list((cache / "entries").glob("*/*"))) == 2


# ---- environment errors -------------------------------------------------------------------------

def test_a_full_disk_while_publishing_is_one_line_and_keeps_the_previous_output(tiny_model, tmp_path, capsys,
                                                                                 monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert build(capsys, recipe(tmp_path, tiny_model()), cache)[0] == 0
    before = tree_bytes(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / ".recipe-runner" / "staging" / "x"))

    monkeypatch.setattr(publish, "copy_tree", full)
    code, _, err = build(capsys, recipe(tmp_path, tiny_model(), extra=VERIFY), cache)
    line = one_line_error(err)
    assert code == 2 and line == (f"error: no space left on device while publishing to {out}; the previous output "
                                  "is unchanged. Free space (`recipe cache gc` removes old cache entries) or choose "
                                  "an output.dir on another disk")
    assert tree_bytes(out) == before and os.listdir(out / ".recipe-runner" / "staging") == []


def test_copy_tree_copies_bytes_and_never_links(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "COPY_BLOCK", 1 << 20)  # three ranges of a.bin, on three threads
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3 << 20))
    (src / "sub" / "b.txt").write_bytes(b"hello")
    (src / "empty").write_bytes(b"")
    os.chmod(src / "a.bin", 0o444)
    stats = copy_tree(src, tmp_path / "dest", threads=3)
    assert tree_bytes(tmp_path / "dest") == tree_bytes(src)
    assert (stats.files, stats.bytes) == (3, (3 << 20) + 5)
    for name in ("a.bin", "sub/b.txt", "empty"):
        assert os.stat(tmp_path / "dest" / name).st_ino != os.stat(src / name).st_ino
    assert os.stat(tmp_path / "dest" / "a.bin").st_mode & 0o777 == 0o444
    os.symlink("a.bin", src / "link")
    with pytest.raises(ValueError, match="a symbolic link where only regular files may be"):
        copy_tree(src, tmp_path / "dest2")


@pytest.mark.parametrize("case", ["home", "inside-source"])
def test_a_cache_that_overlaps_home_or_the_source_is_refused(tiny_model, copy_model, tmp_path, capsys, monkeypatch,
                                                             case):
    model = copy_model(tiny_model())
    if case == "home":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        cache, expected = tmp_path / "home", "is your home directory"
        cache.mkdir()
    else:
        cache, expected = model / "cache", f"is inside the source model ({model})"
    before = tree_bytes(model)
    code, _, err = build(capsys, recipe(tmp_path, model), cache)
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"error: cache directory {cache} (--cache-dir or $RECIPE_CACHE_DIR) ")
    assert expected in line and tree_bytes(model) == before and not (tmp_path / "out").exists()


def test_a_full_disk_while_a_stage_runs_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    from recipe_runner.stages import convert

    def full(job):
        raise OSError(errno.ENOSPC, "No space left on device", str(job.out_dir / "model.json"))

    monkeypatch.setattr(convert, "run_convert", full)
    cache = tmp_path / "cache"
    code, _, err = build(capsys, recipe(tmp_path, tiny_model()), cache)
    line = one_line_error(err)
    assert code == 2 and line.startswith(f"error: [convert] cannot write the cache entry in {cache}: No space left")
    assert "free space (`recipe cache gc`)" in line
    assert not list((cache / "tmp").iterdir()) and not (cache / "entries").exists()


def test_a_locked_rebuild_publishes_from_its_scratch_store_with_an_empty_cache(tiny_model, tmp_path, capsys):
    cache, r = tmp_path / "cache", recipe(tmp_path, tiny_model(), extra=VERIFY)
    assert build(capsys, r, cache)[0] == 0
    lock = tmp_path / "kept.lock"
    lock.write_bytes((tmp_path / "out" / "recipe.lock").read_bytes())
    code, stdout, _ = run_cli(capsys, "cache", "gc", "--max-size", "0", "--cache-dir", str(cache))
    assert code == 0 and stdout.strip().splitlines()[-1].startswith("removed 3 entries")
    (tmp_path / "out" / "checkpoint").unlink()  # our link: the next publish must make a new generation
    code, stdout, err = build(capsys, r, cache, "--locked", str(lock))
    assert code == 0, err
    assert "bit-identical" in stdout and (tmp_path / "out" / "recipe.lock").read_bytes() == lock.read_bytes()
    lock_ok(capsys, tmp_path / "out")


def _legacy_output(out: Path, lock_outputs: dict[str, bytes]) -> None:
    """An output directory as recipe-runner 0.1 published it: real folders, a recipe.lock, logs/."""
    import hashlib

    for rel, data in lock_outputs.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "logs").mkdir()
    (out / "logs" / "build-engine.log").write_text("$ trtllm-build\n")
    lock = {"lock_version": 1, "recipe": {"name": "tiny", "path": "r.yaml", "sha256": "0" * 64}, "tools": {},
            "sources": {}, "stages": [], "outputs": {rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                                                     for rel, d in lock_outputs.items()}}
    (out / "recipe.lock").write_text(json.dumps(lock))


def test_an_earlier_recipe_runner_publish_is_adopted_and_replaced(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    _legacy_output(out, {"checkpoint/config.json": b"{}", "checkpoint/rank0.safetensors": b"\x00" * 16,
                         "verify/verify.json": b"{}"})
    (out / "mine.txt").write_text("keep")  # a user's file beside it still needs --force
    r = recipe(tmp_path, tiny_model())
    code, _, err = build(capsys, r, tmp_path / "cache")
    assert code == 2 and "(1 entries: mine.txt)" in one_line_error(err)
    code, _, err = build(capsys, r, tmp_path / "cache", "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".recipe-runner", "build.json", "checkpoint", "mine.txt", "recipe.lock"]
    assert (out / "mine.txt").read_text() == "keep" and (out / "checkpoint").is_symlink()
    assert len(os.listdir(out / ".recipe-runner" / "generations")) == 2  # the legacy one is gone
    lock_ok(capsys, out)


def test_a_legacy_looking_directory_with_an_unlisted_file_is_not_adopted(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    _legacy_output(out, {"checkpoint/config.json": b"{}", "checkpoint/rank0.safetensors": b"\x00" * 16})
    (out / "checkpoint" / "notes.txt").write_text("mine")
    code, _, err = build(capsys, recipe(tmp_path, tiny_model()), tmp_path / "cache", "--force")
    line = one_line_error(err)
    assert code == 2 and f"{out / 'checkpoint'} exists and was not written by recipe-runner" in line
    assert (out / "checkpoint" / "notes.txt").read_text() == "mine"


def test_a_pure_legacy_publish_needs_no_force(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    _legacy_output(out, {"checkpoint/config.json": b"{}", "checkpoint/rank1.safetensors": b"\x01" * 8})
    code, _, err = build(capsys, recipe(tmp_path, tiny_model()), tmp_path / "cache")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".recipe-runner", "build.json", "checkpoint", "recipe.lock"]
    assert sorted(os.listdir(out / "checkpoint")) == ["config.json", "rank0.safetensors"]
    lock_ok(capsys, out)


def test_a_users_own_build_json_is_never_replaced(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.json").write_text('{"mine": true}')
    r = recipe(tmp_path, tiny_model())
    code, _, err = build(capsys, r, tmp_path / "cache")
    assert code == 2 and "(1 entries: build.json)" in one_line_error(err)
    code, _, err = build(capsys, r, tmp_path / "cache", "--force")  # beside a user's files, never over them
    assert code == 2 and f"{out / 'build.json'} exists and was not written by recipe-runner" in one_line_error(err)
    assert (out / "build.json").read_text() == '{"mine": true}'
