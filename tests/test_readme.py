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


def test_the_test_extra_brings_the_ray_executor():
    # README: the `test` extra includes Ray, so the Ray executor's test runs under the test command
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "The `test` extra includes Ray" in README and "'recipe-runner[ray]'" in README
    ray = [r for r in extras["test"] if r.split(">")[0].strip() == "ray"]
    assert ray == extras["ray"] == ["ray>=2.20"]


def test_readme_and_recipes_cite_only_what_exists():
    # the "Format decisions" section, design.md and ../shared are not part of the project
    texts = [README, *(p.read_text() for p in sorted((REPO / "recipes").rglob("*.yaml"))),
             *(p.read_text() for p in sorted((REPO / "recipe_runner").rglob("*.py")))]
    for gone in ("Format decisions", "design.md", "../shared"):
        assert not [t for t in texts if gone in t], gone
    # what they cite instead
    assert "\n## Quantization\n" in README and "the w8a16 row" in (REPO / "recipes" / "llama-70b-int8-tp4.yaml").read_text()
    for path in ("recipe_runner/hfexport", "recipe_runner/quant/algorithms.py", "recipe_runner/quant/weight_only.py"):
        assert (REPO / path).exists()
