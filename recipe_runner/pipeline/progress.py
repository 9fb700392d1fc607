"""A live progress line for long builds: bytes written per running stage, rate and ETA.

Stages write into their cache temp directory (cache/tmp/<key>.*), so progress is read from
the filesystem: it works the same for stages in this process, in worker processes and in Ray
tasks on a shared filesystem. Only on a terminal; CI logs stay quiet.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


@dataclass
class _Tracked:
    stage: str
    expected: int | None  # bytes the stage will write, when it can be estimated
    started: float = field(default_factory=time.monotonic)


def _written(tmp_root: Path, key: str) -> int:
    total = 0
    for directory in tmp_root.glob(f"{key}.*"):
        for path in directory.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:  # renamed or removed while we looked
                pass
    return total


def format_size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, ... 13.0 GiB, 1.2 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, cache_root: Path, stream: TextIO | None = None, interval: float = 0.5):
        self.tmp_root = cache_root / "tmp"
        # sys.stderr when called, not at import: callers (pytest's capsys, embedding apps) replace it
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self.tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.enabled else None

    def __enter__(self) -> "Progress":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self.stream.write("\r\033[K")
            self.stream.flush()

    def track(self, key: str, stage: str, expected: int | None = None) -> None:
        with self._lock:
            self.tracked[key] = _Tracked(stage, expected)

    def untrack(self, key: str) -> None:
        with self._lock:
            self.tracked.pop(key, None)

    def line(self) -> str:
        parts = []
        with self._lock:
            items = list(self.tracked.items())
        for key, job in items:
            written = _written(self.tmp_root, key)
            elapsed = max(time.monotonic() - job.started, 1e-3)
            rate = written / elapsed
            text = f"{job.stage} {key[:8]}: {format_size(written)}, {format_size(rate)}/s"
            if job.expected and rate > 0 and written < job.expected:
                text += f", ETA {(job.expected - written) / rate:.0f} s"
            parts.append(text)
        return " | ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            width = 200
            self.stream.write(f"\r\033[K{self.line()[:width]}")
            self.stream.flush()
