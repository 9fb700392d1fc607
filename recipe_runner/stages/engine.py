"""Engine stage: run the real trtllm-build on the shard stage's checkpoint.

trtllm-build's output is streamed to a log file (kept in the output directory even when the
build fails, and copied into the engine artifact when it succeeds) with a live progress line
on a terminal. A failed build raises StageFailed with the log's last lines; the cache keeps
nothing of it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from recipe_runner.engine_options import engine_argv
from recipe_runner.errors import StageFailed

if TYPE_CHECKING:
    from recipe_runner.cache import Entry
    from recipe_runner.resolve import ResolvedPlan

LOG_NAME = "build.log"
TAIL_LINES = 20


def engine_log_path(resolved: "ResolvedPlan") -> Path:
    return resolved.plan.recipe.resolve_path("output.dir") / "logs" / "build-engine.log"


def run_engine(resolved: "ResolvedPlan", entries: dict[str, "Entry"], data_dir: Path, workers: int) -> None:
    toolchain = resolved.toolchain
    assert toolchain is not None, "the build checks for trtllm-build before any stage runs"
    engine = resolved.plan.recipe.data["engine"]
    argv = [*toolchain.command, *engine_argv(engine, str(entries["shard"].path), str(data_dir), toolchain.version)]
    log_path = engine_log_path(resolved)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    returncode, tail = _stream(argv, log_path, cwd=data_dir)
    if returncode != 0:
        lines = "\n    ".join(tail) or "(no output)"
        raise StageFailed(f"trtllm-build failed with exit code {returncode}; last lines of its log:\n    {lines}\n"
                          f"full log: {log_path}\ncommand: {' '.join(argv)}")
    shutil.copyfile(log_path, data_dir / LOG_NAME)


def _stream(argv: list[str], log_path: Path, cwd: Path) -> tuple[int, list[str]]:
    """Run argv, writing its output to log_path as it comes; (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    live = sys.stderr.isatty()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(argv)}\n")
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if live:  # one line, rewritten in place; CI logs stay quiet
                width = shutil.get_terminal_size().columns - 20
                sys.stderr.write(f"\r\033[K[build-engine] {tail[-1][:width]}")
                sys.stderr.flush()
        returncode = proc.wait()
    if live:
        sys.stderr.write("\r\033[K")
    return returncode, list(tail)
