"""The README's two fresh-machine commands stay true to what CI and the CLI do."""
from __future__ import annotations

import re

from tests.recipe_files import REPO

README = (REPO / "README.md").read_text()
CI = (REPO / ".ci" / "run").read_text()


def _commands() -> list[str]:
    return [line.strip() for line in README.splitlines() if line.strip().startswith("python3 -m venv .venv")]


def test_readme_has_the_demo_and_the_test_command():
    demo, tests = _commands()
    assert demo.endswith("&& recipe demo")
    assert "pip install torch==2.13.0" in demo and "pip install -e ." in demo
    assert tests.endswith("&& python -m pytest -q")


def test_ci_runs_the_readme_test_command_and_install_steps():
    _, tests = _commands()
    test_command = tests.split("&&")[-1].strip()
    ci_lines = [line.strip() for line in CI.splitlines()]
    assert test_command in ci_lines
    assert "pip install torch==2.13.0" in ci_lines and "pip install -e '.[test]'" in ci_lines
    # pytest's "no tests collected" must fail CI
    assert re.search(r'if \[ "\$status" -eq 5 \]; then', CI)
