"""How far a long computation is, for the build's live progress display.

A stage that computes rather than writes (calibrate: samples × layers; verify: layers × inputs; the
engine build: trtllm-build's last line) reports its count here. The count goes to a small JSON file
beside the stage's payload directory (never inside it, so it never enters the cache entry), which
the driver's display reads: that works the same for a stage in this process, in a worker process
or in a Ray task on a shared filesystem (see recipe_runner.pipeline.progress).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS_NAME = "progress.json"
INTERVAL_ENV = "RECIPE_RUNNER_PROGRESS_INTERVAL"  # seconds between redraws and count writes (tests shorten it)


def progress_interval() -> float:
    try:
        return max(float(os.environ.get(INTERVAL_ENV, "0.5")), 0.0)
    except ValueError:
        return 0.5


@dataclass(eq=False)  # a counter is itself, not its value (and may be a default)
class WorkProgress:
    """A counter written to `path` at most once per interval (and always when the work completes);
    `path` None reports nowhere. `part`/`parts` place this counter's work within a larger job
    (verify's second checkpoint is part 1 of 2), so the job's count keeps increasing."""

    path: Path | None = None
    part: int = 0
    parts: int = 1
    interval: float = field(default_factory=progress_interval)
    _state: dict = field(default_factory=dict)  # shared by every part: what was last written, and when

    def part_of(self, part: int, parts: int) -> "WorkProgress":
        return WorkProgress(self.path, part, parts, self.interval, self._state)

    def update(self, done: int, total: int, unit: str) -> None:
        """`done` of `total` units of this part; a new count replaces the last note."""
        overall = total * self.parts
        self._state["note"] = None
        self._write({"done": self.part * total + done, "total": overall, "unit": unit},
                    force=self.part * total + done >= overall)

    def note(self, text: str) -> None:
        """A word on what runs now (the engine build's last output line, "AWQ search, layer 3")."""
        record = dict(self._state.get("record") or {})
        record["note"] = self._state["note"] = text
        self._write(record, force=False)

    def _write(self, record: dict, force: bool) -> None:
        self._state["record"] = record
        now = time.monotonic()
        if self.path is None or (not force and now - self._state.get("written", -1e9) < self.interval):
            return
        self._state["written"] = now
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, self.path)  # readers see the old count or the new one, never half a file
        except OSError:  # the display is a courtesy: never fail a stage over it
            pass


NO_PROGRESS = WorkProgress()


def read_progress(path: Path) -> dict | None:
    """The last count written at `path`, or None (none yet, or removed with its temp dir)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None

