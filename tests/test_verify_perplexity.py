"""verify.perplexity: both models' perplexity on held-out text, its limit, its dataset in the key,
the preflight and the lock; and the layer-by-layer trace in the published report."""
from __future__ import annotations

import json
import math
from pathlib import Path

from recipe_runner.store.lock import read_lock
from recipe_runner.verify.metrics import Figures, PerplexityFigures
from recipe_runner.verify.tolerances import check, default_tolerances
from tests.recipe_files import run_cli
from tests.test_verify_build import build, write_recipe

HELD_OUT = "\n".join(f"Line {i} of a held-out text about tensors, ranks and layers." for i in range(40)) + "\n"


def _perplexity_recipe(tmp_path: Path, model: Path, extra: str = "") -> Path:
    (tmp_path / "held-out.txt").write_text(HELD_OUT)
    return write_recipe(tmp_path, model, "  perplexity:\n    dataset: held-out.txt\n    num_tokens: 100\n"
                                         "    seq_len: 32\n" + extra)


def test_held_out_perplexity_is_measured_reported_and_locked(tiny_model, tmp_path, capsys):
    model = tiny_model("gqa", with_tokenizer=True)
    recipe = _perplexity_recipe(tmp_path, model)
    result = build(recipe, tmp_path / "cache")
    report = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    held = report["perplexity"]
    assert held["windows"] == 4 and held["tokens"] == 31 + 31 + 31 + 3  # 100 tokens: 32 + 32 + 32 + 4
    assert [i["label"] for i in report["inputs"]][-4:] == ["perplexity 1", "perplexity 2", "perplexity 3", "perplexity 4"]
    assert [i["tokens"] for i in report["inputs"]][-4:] == [32, 32, 32, 4]
    # a float16 checkpoint of a float32 model: the same text, nearly the same perplexity
    assert 10 < held["perplexity_source"] and abs(held["perplexity_ratio"] - 1) < 1e-3
    assert math.isclose(held["recovery"], 1 / held["perplexity_ratio"], rel_tol=1e-5)
    assert report["tolerances"]["max_perplexity_ratio"] == 1.01
    markdown = (result.output_dir / "verify" / "verify.md").read_text()
    assert "| perplexity ratio (held-out text) |" in markdown and "Held-out text (verify.perplexity): 4 window(s)" in markdown
    assert "## Layer by layer" in markdown and markdown.count("| ██") + markdown.count("`█") >= 4
    lock = read_lock(result.lock_path)
    assert lock.perplexity == {"dataset": "held-out.txt", "files": {"held-out.txt": {
        "size": len(HELD_OUT), "sha256": __import__("hashlib").sha256(HELD_OUT.encode()).hexdigest()}}}
    first_lock = tmp_path / "first.lock"
    first_lock.write_text(result.lock_path.read_text())
    # the held-out text is an input of the verify key alone
    (tmp_path / "held-out.txt").write_text(HELD_OUT.replace("tensors", "vectors"))
    again = build(recipe, tmp_path / "cache")
    assert {t["stage"]: t["action"] for t in again.trace} == {"convert": "cached", "shard": "cached", "verify": "ran"}
    code, _, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(tmp_path / "cache"), "--locked",
                           str(first_lock))
    assert code == 2 and "perplexity held-out.txt: content differs" in err


def test_a_missing_held_out_file_is_found_before_any_stage(tiny_model, tmp_path, capsys):
    model = tiny_model("gqa", with_tokenizer=True)
    recipe = _perplexity_recipe(tmp_path, model)
    (tmp_path / "held-out.txt").unlink()
    code, out, err = run_cli(capsys, "plan", str(recipe), "--check", "--cache-dir", str(tmp_path / "cache"))
    assert code == 2
    assert (f"r.yaml:15:14: verify.perplexity.dataset: perplexity file {tmp_path / 'held-out.txt'} not found"
            in err), err


def test_the_perplexity_ratio_has_a_limit():
    figures = Figures(10, 0.01, 0.001, 1e-6, 1.0, 20.0, 20.0)
    limits = default_tolerances("W8A16", None)
    within = PerplexityFigures(2, 60, 20.0, 20.5)
    beyond = PerplexityFigures(2, 60, 20.0, 20.8)
    assert check(figures, limits, perplexity=within) == []
    (failure,) = check(figures, limits, perplexity=beyond)
    assert failure.limit_name == "max_perplexity_ratio" and failure.message == "perplexity_ratio 1.04 > 1.03"
