"""The live progress display of a build: one line per running stage, drawn with rich.

What a line shows comes from the filesystem, so it works the same for stages in this process, in
worker processes and in Ray tasks on a shared filesystem: a stage that reports counts
(recipe_runner.io.work_progress: calibrate's samples × layers, verify's layers × inputs) shows
them with a bar, rate and ETA; every other stage shows the bytes written into its cache temp
directory (cache/tmp/<key>.*/data), rate and, where the size is known, an ETA.

Only on a terminal: while the display is up, rich prints every log line (anything written to
sys.stdout or sys.stderr) above it, so a log line never lands on a half-drawn progress line. CI
logs get no display, only the log lines: one "[stage] running" and one "[stage] ran in …" (or
"cached") line per stage.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, TextColumn
from rich.progress import Progress as RichProgress

from recipe_runner.io.work_progress import PROGRESS_NAME, progress_interval, read_progress


@dataclass
class _Tracked:
    stage: str
    label: str  # the stage and, in builds of several recipes, whose
    expected: int | None  # bytes the stage will write, when it can be estimated
    started: float = field(default_factory=time.monotonic)
    task: int | None = None  # the rich task drawing it
    counts: dict | None = None  # the stage's last count (kept when its temp dir goes at the end)


def _written(tmp_root: Path, key: str) -> int:
    total = 0
    for directory in tmp_root.glob(f"{key}.*"):
        for dirpath, _, filenames in os.walk(directory):  # os.walk skips what vanishes as it looks
            for name in filenames:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size if name != PROGRESS_NAME else 0
                except OSError:  # renamed or removed while we looked (the stage finished)
                    pass
    return total


def _counts(tmp_root: Path, key: str) -> dict | None:
    for directory in tmp_root.glob(f"{key}.*"):
        record = read_progress(directory / PROGRESS_NAME)
        if record is not None:
            return record
    return None


def format_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, ... 13.0 GiB, 1.2 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _eta(remaining: float, rate: float) -> str:
    return f", ETA {remaining / rate:.0f} s" if rate > 0 and remaining > 0 else ""


def describe(tmp_root: Path, key: str, job: _Tracked) -> tuple[str, float | None, float]:
    """(text, total, done) of one running stage: its counts when it reports them, else its bytes."""
    elapsed = max(time.monotonic() - job.started, 1e-3)
    head = f"{job.label} {key[:8]}"
    counts = job.counts = _counts(tmp_root, key) or job.counts
    if counts and isinstance(counts.get("total"), int) and counts["total"] > 0:
        done, total = int(counts.get("done") or 0), counts["total"]
        text = f"{head}: {done}/{total} {counts.get('unit', '')}{_eta(total - done, done / elapsed)}"
        return (text + (f" ({counts['note']})" if counts.get("note") else "")), total, done
    if counts and counts.get("note"):
        return f"{head}: {counts['note']}", None, 0
    written = _written(tmp_root, key)
    rate = written / elapsed
    text = f"{head}: {format_size(written)}, {format_size(rate)}/s"
    if job.expected:
        text += _eta(job.expected - written, rate)
    return text, job.expected, min(written, job.expected or written)


class Progress:
    def __init__(self, cache_root: Path, stream: TextIO | None = None, interval: float | None = None):
        self.tmp_root = cache_root / "tmp"
        # sys.stderr when called, not at import: callers (pytest's capsys, embedding apps) replace it
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = max(interval if interval is not None else progress_interval(), 0.02)
        self.tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bars: RichProgress | None = None
        self._thread = threading.Thread(target=self._run, daemon=True) if self.enabled else None

    def __enter__(self) -> "Progress":
        if self._thread:
            console = Console(file=self.stream, force_terminal=True, highlight=False)
            # transient: the display goes when the build ends, the log lines above it stay
            self._bars = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=24),
                                      console=console, auto_refresh=False, transient=True,
                                      redirect_stdout=True, redirect_stderr=True)
            self._bars.start()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._bars is not None:
            self._bars.stop()

    def track(self, key: str, stage: str, expected: int | None = None, label: str | None = None) -> None:
        with self._lock:
            self.tracked[key] = _Tracked(stage, label or stage, expected)

    def untrack(self, key: str) -> None:
        with self._lock:
            job = self.tracked.pop(key, None)
            if job is not None and job.task is not None and self._bars is not None:
                self._bars.remove_task(job.task)

    def line(self) -> str:
        """Every running stage's text on one line (what a test or a plain log could show)."""
        with self._lock:
            items = list(self.tracked.items())
        return " | ".join(describe(self.tmp_root, key, job)[0] for key, job in items)

    def _draw(self) -> None:
        with self._lock:
            for key, job in self.tracked.items():
                text, total, done = describe(self.tmp_root, key, job)
                if job.task is None:
                    job.task = self._bars.add_task(text, total=total, completed=done)
                else:
                    self._bars.update(job.task, description=text, total=total, completed=done)
        self._bars.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._draw()
            except OSError:  # a temp dir renamed as we read it: the next frame sees the new state
                pass
