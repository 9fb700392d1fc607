"""`recipe build` as a release engineer watches it: in a pseudo-terminal the live display shows
calibrate's samples × layers and verify's layer runs (3 × layers × inputs: verify/trace.py) counting up, and log lines never land on
a half-drawn progress line; logs without a terminal get one running and one ran line per stage; a
build waiting on another's lock says so."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipe_runner.io.work_progress import INTERVAL_ENV
from recipe_runner.store.cache import CacheStore
from tests.recipe_files import run_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

RECIPE = """\
recipe_version: 1
name: watched
source:
  path: {model}
  dtype: float16
quantization:
  algo: w8a8_sq_per_channel
  calibration:
    dataset: {dataset}
    num_samples: 48
    max_seq_len: 32
    batch_size: 1
verify:
  token_ids: {token_ids}
output:
  dir: out
"""


def _run_in_terminal(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal; (exit code, everything it drew)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def _counts(output: str, stage: str, unit: str) -> list[tuple[int, int]]:
    pattern = rf"{stage} [0-9a-f]{{8}}: (\d+)/(\d+) {re.escape(unit)}"
    return [(int(d), int(t)) for d, t in re.findall(pattern, ANSI.sub("", output))]


def test_a_terminal_shows_calibrate_and_verify_counting_up(quant_model, calib_file, tmp_path):
    token_ids = [[1 + i, 5 + i, 9 + i, 13 + i, 17 + i, 21 + i] * 4 for i in range(12)]
    (tmp_path / "r.yaml").write_text(RECIPE.format(model=quant_model, dataset=calib_file, token_ids=token_ids))
    env = {**os.environ, INTERVAL_ENV: "0", "COLUMNS": "200", "TERM": "xterm"}
    argv = [sys.executable, "-c", "from recipe_runner.cli import main; main()", "build", "r.yaml",
            "--cache-dir", str(tmp_path / "cache")]
    code, output = _run_in_terminal(argv, tmp_path, env)
    assert code == 0, output[-3000:]
    layers = 4  # the quant_model fixture
    samples = min(48, len(calib_file.read_text().splitlines()))  # one sample per line of the file
    calibrate = _counts(output, "calibrate", "samples×layers")
    verify = _counts(output, "verify", "layers×inputs")
    for counts, total in ((calibrate, samples * layers), (verify, 3 * layers * len(token_ids))):
        assert counts, output[-3000:]
        assert {t for _, t in counts} == {total}
        done = [d for d, _ in counts]
        assert done == sorted(done) and len(set(done)) >= 3, done  # it moved, and only forwards
        assert 0 < done[-1] <= total
    # every log line starts a line of its own: no progress text drawn before it on the same line
    text = ANSI.sub("", output).replace("\r\n", "\n")
    shown = [line.split("\r")[-1] for line in text.split("\n")]  # what the terminal shows after each \r
    logs = [line for line in shown if re.search(r"\[(calibrate|verify)\]", line)]
    assert logs and all(line.startswith("[") for line in logs), logs
    assert any(re.fullmatch(r"\[calibrate\] ran in \d+\.\d s, peak RSS \d+\.\d MiB \([0-9a-f]{12}\)", line)
               for line in logs), logs


def test_logs_get_one_running_and_one_ran_line_per_stage(quant_model, calib_file, tmp_path):
    recipe = RECIPE.format(model=quant_model, dataset=calib_file, token_ids=[[1, 2, 3, 4]])
    (tmp_path / "r.yaml").write_text(recipe.replace("algo: w8a8_sq_per_channel", "algo: none"))
    argv = [sys.executable, "-c", "from recipe_runner.cli import main; main()", "build", "r.yaml",
            "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, INTERVAL_ENV: "0"}, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr and "\x1b[" not in done.stdout + done.stderr
    for stage in ("convert", "shard", "verify"):
        assert len(re.findall(rf"^\[{stage}\] running \(", done.stdout, re.M)) == 1, done.stdout
        assert len(re.findall(rf"^\[{stage}\] ran in \d+\.\d s, peak RSS \d+\.\d [KMG]iB \(", done.stdout, re.M)) == 1


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(1.5)
lock.release()
"""


def test_a_build_waiting_on_another_builds_lock_says_so(tiny_model, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_model("gqa"), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.yaml").write_text("recipe_version: 1\nname: w\nsource:\n  path: model\noutput:\n  dir: out\n")
    cache = tmp_path / "cache"
    code, out, err = run_cli(capsys, "plan", "w.yaml", "--format", "json", "--cache-dir", str(cache))
    assert code == 0, err
    key = next(s["key"] for s in json.loads(out)["recipes"][0]["stages"] if s["name"] == "convert")
    CacheStore(cache).lock(key)  # makes the locks folder
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(cache / "locks" / f"{key}.lock")],
                              stdout=subprocess.PIPE, text=True)  # what another build running this stage holds
    assert holder.stdout.readline() == "held\n"
    code, out, err = run_cli(capsys, "build", "w.yaml", "--cache-dir", str(cache))
    holder.wait(timeout=30)
    assert code == 0, err
    lines = out.splitlines()
    waiting = next(i for i, line in enumerate(lines) if line.startswith("[convert] waiting: "))
    assert f"holds this stage's lock ({key[:12]}, {cache / 'locks' / (key + '.lock')})" in lines[waiting]
    assert lines[waiting + 1].startswith("[convert] running (")  # the holder built nothing: this build does
