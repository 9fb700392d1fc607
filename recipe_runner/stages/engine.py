"""Engine stage: run the real trtllm-build on the shard stage's checkpoint.

trtllm-build's output is streamed to a log file, which becomes the engine artifact's build.log
(<output>/engine/build.log) when it succeeds; its last line is the stage's progress note (shown
by the build's live display on a terminal). A failed
build raises StageFailed with the log's last lines; the cache keeps no entry, and the log is kept
in the cache's logs/ folder (until `recipe cache gc`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from recipe_runner.trtllm.engine_options import engine_argv
from recipe_runner.errors import StageFailed
from recipe_runner.store.cache import failure_log_path

if TYPE_CHECKING:
    from recipe_runner.stages.registry import StageJob

LOG_NAME = "build.log"
TAIL_LINES = 20


def run_engine(job: "StageJob") -> None:
    toolchain, data_dir = job.toolchain, job.out_dir
    assert toolchain is not None, "the build checks for trtllm-build before any stage runs"
    engine = job.params
    checkpoint = str(job.inputs["shard"])
    argv = [*toolchain.command, *engine_argv(engine, checkpoint, str(data_dir), job.params["tensorrt_llm"])]
    # The log is the entry's (engine/build.log once published), so its header names no path of this
    # machine (the cache, where trtllm-build is installed): the same key, the same header.
    command = [os.path.basename(part) for part in toolchain.command]  # where it is installed is no key
    header = " ".join([*command, *argv[len(command):]]).replace(checkpoint, "<checkpoint>").replace(
        str(data_dir), "<engine>")
    log_path = data_dir.parent / f"build-engine.{LOG_NAME}"  # beside the payload until it succeeds
    returncode, tail = _stream(argv, header, log_path, cwd=data_dir, note=job.progress.note)
    if returncode != 0:
        kept = failure_log_path(data_dir, "build-engine")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(log_path, kept)
        lines = "\n    ".join(tail) or "(no output)"
        raise StageFailed(f"trtllm-build failed with exit code {returncode}; last lines of its log:\n    {lines}\n"
                          f"full log: {kept}\ncommand: {' '.join(argv)}")
    os.replace(log_path, data_dir / LOG_NAME)


def _stream(argv: list[str], header: str, log_path: Path, cwd: Path,
            note: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run argv, writing its output to log_path as it comes; (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {header}\n")
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            note(tail[-1])
        returncode = proc.wait()
    return returncode, list(tail)
