"""Publishing: the output becomes an exact copy of the source tree, hardlinked where possible,
replacing the previous output whole."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from recipe_runner import publish
from recipe_runner.errors import UserError
from recipe_runner.publish import publish_tree


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


FILES = {"config.json": b"{}", "rank0.safetensors": b"\x01" * 1000, "logs/build.log": b"ok\n"}


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


def test_publish_hardlinks_when_possible(tmp_path):
    src = make_tree(tmp_path / "entry", FILES)
    dest = tmp_path / "out" / "checkpoint"
    publish_tree(src, dest)
    assert snapshot(dest) == FILES
    for name in FILES:
        assert os.stat(dest / name).st_ino == os.stat(src / name).st_ino
    assert no_leftovers(dest.parent)


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM])
def test_publish_copies_when_links_are_refused(tmp_path, monkeypatch, code):
    def refuse(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(publish.os, "link", refuse)
    src = make_tree(tmp_path / "entry", FILES)
    os.chmod(src / "config.json", 0o444)
    dest = tmp_path / "out"
    publish_tree(src, dest)
    assert snapshot(dest) == FILES
    assert os.stat(dest / "config.json").st_ino != os.stat(src / "config.json").st_ino
    assert os.stat(dest / "config.json").st_mode == os.stat(src / "config.json").st_mode  # copy2-like


def test_other_link_errors_are_not_swallowed(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(publish.os, "link", broken)
    with pytest.raises(OSError, match="I/O error"):
        publish_tree(make_tree(tmp_path / "entry", FILES), tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_publish_replaces_the_previous_output(tmp_path):
    dest = make_tree(tmp_path / "out", {"config.json": b"old", "rank1.safetensors": b"stale", "x/y": b"z"})
    publish_tree(make_tree(tmp_path / "entry", FILES), dest)
    assert snapshot(dest) == FILES  # stale files and directories are gone
    assert no_leftovers(tmp_path)


def test_failure_midway_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    old = {"config.json": b"old", "rank0.safetensors": b"old weights"}
    dest = make_tree(tmp_path / "out", old)
    real_link, calls = os.link, []

    def fail_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(publish.os, "link", fail_on_second)
    with pytest.raises(OSError, match="No space"):
        publish_tree(make_tree(tmp_path / "entry", FILES), dest)
    assert snapshot(dest) == old
    assert no_leftovers(tmp_path)


def test_failed_final_rename_restores_the_previous_output(tmp_path, monkeypatch):
    old = {"config.json": b"old"}
    dest = make_tree(tmp_path / "out", old)
    real_rename = os.rename

    def fail_second_rename(src, dst):
        if Path(src).name.startswith(".out.publish-"):
            raise OSError(errno.EIO, "rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(publish.os, "rename", fail_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        publish_tree(make_tree(tmp_path / "entry", FILES), dest)
    assert snapshot(dest) == old and no_leftovers(tmp_path)


def test_leftovers_of_a_killed_publish_are_cleaned(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = make_tree(tmp_path / f".out.publish-{dead_pid}-abcd1234", {"a": b"1"})
    publish_tree(make_tree(tmp_path / "entry", FILES), tmp_path / "out")
    assert not stale.exists() and no_leftovers(tmp_path)


def test_dest_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a dir")
    with pytest.raises(UserError, match="is not a directory"):
        publish_tree(make_tree(tmp_path / "entry", FILES), tmp_path / "out")
