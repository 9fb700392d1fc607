"""The live progress line: bytes from the stage's temp dir, rate, ETA; silent without a terminal."""
from __future__ import annotations

import io

from recipe_runner.pipeline.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_reports_bytes_and_eta(tmp_path):
    key = "ab" * 32
    work = tmp_path / "tmp" / f"{key}.123.cafe" / "data"
    work.mkdir(parents=True)
    (work / "rank0.safetensors").write_bytes(b"x" * 2048)
    progress = Progress(tmp_path, stream=FakeTerminal())
    progress.track(key, "shard", expected=4096)
    line = progress.line()
    assert line.startswith(f"shard {key[:8]}: 2.0 KiB, ") and "/s, ETA " in line
    progress.untrack(key)
    assert progress.line() == ""


def test_progress_is_silent_in_logs(tmp_path):
    stream = io.StringIO()
    with Progress(tmp_path, stream=stream, interval=0.01) as progress:
        progress.track("cd" * 32, "shard")
    assert not progress.enabled and stream.getvalue() == ""


def test_progress_writes_to_a_terminal(tmp_path):
    stream = FakeTerminal()
    key = "ef" * 32
    (tmp_path / "tmp" / f"{key}.1.x").mkdir(parents=True)
    with Progress(tmp_path, stream=stream, interval=0.01) as progress:
        progress.track(key, "convert")
        import time
        time.sleep(0.1)
    assert f"convert {key[:8]}: 0 B" in stream.getvalue()
