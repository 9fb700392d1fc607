"""The live progress display: a stage's counts (or the bytes in its temp dir), rate, ETA; silent
without a terminal."""
from __future__ import annotations

import io
import shutil

from recipe_runner.io.work_progress import NO_PROGRESS, PROGRESS_NAME, WorkProgress, read_progress
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


def test_a_stage_reporting_counts_shows_them_with_an_eta(tmp_path):
    key = "12" * 32
    work = tmp_path / "tmp" / f"{key}.7.beef"
    (work / "data").mkdir(parents=True)
    counter = WorkProgress(work / PROGRESS_NAME, interval=0)
    counter.update(30, 120, "samples×layers")
    progress = Progress(tmp_path, stream=FakeTerminal())
    progress.track(key, "calibrate")
    line = progress.line()
    assert line.startswith(f"calibrate {key[:8]}: 30/120 samples×layers, ETA ") and line.endswith(" s")
    counter.note("AWQ scale search, layer 2/4")
    assert progress.line().endswith(" s (AWQ scale search, layer 2/4)")
    shutil.rmtree(work)  # the stage finished: its temp dir is renamed into the cache
    assert progress.line().startswith(f"calibrate {key[:8]}: 30/120 samples×layers")  # the last count stays


def test_parts_of_a_job_count_on_from_each_other(tmp_path):
    path = tmp_path / PROGRESS_NAME
    job = WorkProgress(path, interval=0)
    job.part_of(0, 2).update(8, 8, "layers×inputs")
    assert read_progress(path) == {"done": 8, "total": 16, "unit": "layers×inputs"}
    job.part_of(1, 2).update(3, 8, "layers×inputs")
    assert read_progress(path) == {"done": 11, "total": 16, "unit": "layers×inputs"}


def test_counts_are_written_at_most_once_per_interval_and_always_at_the_end(tmp_path):
    path = tmp_path / PROGRESS_NAME
    counter = WorkProgress(path, interval=3600)
    counter.update(1, 10, "steps")
    counter.update(2, 10, "steps")  # within the interval: not written
    assert read_progress(path)["done"] == 1
    counter.update(10, 10, "steps")  # done: always written
    assert read_progress(path)["done"] == 10
    NO_PROGRESS.update(1, 2, "steps")  # reports nowhere, writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROGRESS_NAME]
