"""Helpers for tests that write recipe files."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from recipe_runner.cli import main

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
recipe_version: 1
name: tiny
source:
  path: model
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run `recipe ARGV` in-process as the console script does; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
