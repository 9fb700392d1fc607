"""What one stage cost: wall time and peak memory (resident set), for the build summary,
`build --format json` and <output>/build.json. Never in a key or a lock: they differ run to run.

Peak memory is the high-water mark of the process that ran the stage, reset when the stage starts
(Linux: /proc/self/clear_refs), and of the worker processes it started and waited for (the rank
writers of the shard stage). Where the mark cannot be reset, the process's peak so far is all
there is, and the record says so.
"""
from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class StageUsage:
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    peak_since_stage_start: bool = True  # False: the process's peak so far (its mark could not be reset)

    def record(self) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_rss_bytes": self.peak_rss_bytes,
                **({} if self.peak_since_stage_start else {"peak_rss_note": "the process's peak so far"})}


def _own_peak() -> int | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak RSS mark (proc(5))
        return True
    except OSError:
        return False


@contextmanager
def measure() -> Iterator[StageUsage]:
    """Time the block and take its peak RSS (this process, and children that ended within it)."""
    usage = StageUsage()
    usage.peak_since_stage_start = _reset_peak()
    children_before = _children_peak()
    started = time.monotonic()
    try:
        yield usage
    finally:
        usage.seconds = time.monotonic() - started
        own = _own_peak()
        children = _children_peak()
        # a child's mark counts only if a child that ended in this block set a new maximum
        usage.peak_rss_bytes = max(own or 0, children if children > children_before else 0) or None
