"""`recipe diff` on real recipe edits (golden files), and --rev against git history."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.recipe_files import REPO, run_cli

GOLDEN = REPO / "tests" / "golden" / "diff"
PAIRS = {
    "fp16-to-fp8": ("recipes/llama-3.1-8b-fp16-tp1.yaml", "recipes/llama-3.1-8b-fp8-tp1.yaml", "text"),
    "8b-to-70b-int8": ("recipes/llama-3.1-8b-fp16-tp1.yaml", "recipes/llama-70b-int8-tp4.yaml", "markdown"),
    "base-to-codellama": ("recipes/llama-base.yaml", "recipes/codellama-34b-fp16-tp4.yaml", "text"),
}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_diff_of_real_recipes_matches_golden(case, monkeypatch, capsys):
    old, new, fmt = PAIRS[case]
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(capsys, "diff", old, new, "--format", fmt)
    assert code == 0, err
    assert out == (GOLDEN / f"{case}.{'md' if fmt == 'markdown' else 'txt'}").read_text()


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_diff_against_a_git_revision(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "recipes")
    recipe = tmp_path / "recipes" / "llama-70b-int8-tp4.yaml"
    recipe.write_text(recipe.read_text().replace("tp_size: 4", "tp_size: 8").replace("max_batch_size: 64", "max_batch_size: 32"))
    base = tmp_path / "recipes" / "llama-base.yaml"
    base.write_text(base.read_text().replace("tokens_per_block: 32", "tokens_per_block: 64"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "diff", "--rev", "HEAD", "recipes/llama-70b-int8-tp4.yaml")
    assert code == 0, err
    assert out.splitlines() == [
        "recipe diff recipes/llama-70b-int8-tp4.yaml@HEAD -> recipes/llama-70b-int8-tp4.yaml",
        "changed fields:",
        "  engine.max_batch_size: 64 -> 32",
        "  engine.tokens_per_block: 32 -> 64",
        "  mapping.tp_size: 4 -> 8",
        "stages to rebuild:",
        "  shard         changed: tp_size",
        "  verify        input rebuilt: shard",
        "  build-engine  changed: max_batch_size, tokens_per_block",
        "stages reused: convert, quantize",
    ]


def test_description_edit_invalidates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    edited = tmp_path / "edited.yaml"
    edited.write_text((REPO / "recipes" / "llama-2-13b-sq-tp2.yaml").read_text().replace(
        "extends: llama-base.yaml", f"extends: {REPO / 'recipes' / 'llama-base.yaml'}").replace(
        "description: Llama-2-13b-chat", "description: Reviewed. Llama-2-13b-chat"))
    code, out, _ = run_cli(capsys, "diff", "recipes/llama-2-13b-sq-tp2.yaml", str(edited))
    assert code == 0
    assert "stages to rebuild: none" in out
    assert "stages reused: convert, calibrate, quantize, shard, verify, build-engine" in out
