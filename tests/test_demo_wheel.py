"""`recipe demo` from a built wheel, run outside the repository: the demo recipe is package data
(a real file in the wheel, not a link), setuptools' scratch stays out of build/, and the demo prints
its checkpoint, lock, verify figures and report paths. About 30 s (a wheel, a venv, a demo build);
marked slow, but part of the README's test command (`-m "not slow"` leaves it out locally)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from recipe_runner.demo import DEMO_RECIPE, DEMO_RECIPES, demo_prompts, demo_recipe_path
from tests.recipe_files import REPO

REPO_RECIPE = REPO / "recipes" / "demo" / "tiny-llama.yaml"
PACKAGED = "recipe_runner/" + "/".join(DEMO_RECIPE)
# what a wheel build of a checkout must not see: VCS, environments, earlier builds, outputs
SKIP = shutil.ignore_patterns(".git", ".venv", "build", ".setuptools-build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", "tests", "bench")


def test_demo_recipe_is_the_reviewed_recipe():
    link = REPO.joinpath("recipe_runner", *DEMO_RECIPE)
    assert link.is_symlink() and link.resolve() == REPO_RECIPE.resolve()  # one source of truth
    assert demo_recipe_path() == REPO_RECIPE.resolve()
    for model, parts in DEMO_RECIPES.items():  # every --model's recipe: a link to the reviewed file
        link = REPO.joinpath("recipe_runner", *parts)
        assert link.is_symlink() and link.resolve() == (REPO / "recipes" / "demo" / parts[-1]).resolve()
        assert demo_recipe_path(model) == link.resolve()
    assert demo_prompts() == ["The capital of France is", "def fibonacci(n):"]
    assert yaml.safe_load(REPO_RECIPE.read_text())["verify"]["prompts"] == demo_prompts()


def _build_wheel(tmp_path: Path, env: dict) -> Path:
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, symlinks=True, ignore=SKIP)  # links stay links, as in git
    # without setuptools in this environment (Python >= 3.12 venvs), pip fetches it into an isolated one
    args = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *args, "-w", str(tmp_path / "dist"),
                    str(checkout)], check=True, env=env, cwd=tmp_path)
    # setuptools wrote its scratch beside, not into build/ where recipes publish by default
    assert (checkout / ".setuptools-build" / "lib").is_dir() and not (checkout / "build").exists()
    (wheel,) = (tmp_path / "dist").glob("recipe_runner-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp_path: Path, env: dict) -> Path:
    """A fresh venv holding only the wheel; torch and the other dependencies come from this
    interpreter's site-packages (a .pth line: --system-site-packages alone would give the base
    interpreter's, not this venv's)."""
    root = tmp_path / "venv"
    venv.create(root, system_site_packages=True, with_pip=False)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_parent_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: this interpreter's editable recipe-runner is visible; never touch it
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, env=env, cwd=tmp_path)
    return root


@pytest.mark.slow
def test_demo_from_a_wheel_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(RECIPE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    wheel = _build_wheel(tmp_path, env)
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(PACKAGED)
        assert not stat.S_ISLNK(info.external_attr >> 16)  # the file itself, not a dangling link
        assert zf.read(PACKAGED) == REPO_RECIPE.read_bytes()
        for parts in DEMO_RECIPES.values():  # `recipe demo --model smollm2`'s recipe too
            assert zf.read("recipe_runner/" + "/".join(parts)) == (REPO / "recipes" / "demo" / parts[-1]).read_bytes()
        assert zf.read("recipe_runner/data/recipe.v1.schema.json") == (REPO / "schema" / "recipe.v1.schema.json").read_bytes()
    root = _venv_with(wheel, tmp_path, env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(root / "bin" / "python"), "-c", "import recipe_runner; print(recipe_runner.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=work).stdout.strip()
    assert Path(where).is_relative_to(root)  # the wheel's package, not the checkout's

    run = subprocess.run([str(root / "bin" / "recipe"), "demo"], capture_output=True, text=True, env=env, cwd=work,
                         timeout=300)
    out = run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
    model = Path(re.search(r"generated a tiny random LLaMA in (\S+)\n", out)[1])
    ckpt, lock = map(Path, re.search(r"checkpoint in (\S+), lock file (\S+)\n", out).groups())
    md, js = map(Path, re.search(r"verify report: (\S+) \(figures in (\S+)\)\n", out).groups())
    output = work / "build" / "tiny-llama-demo"
    assert model == work / "build" / "demo" / "tiny-llama-hf" and (model / "tokenizer.json").is_file()
    assert (ckpt, lock, md, js) == (output / "checkpoint", output / "recipe.lock", output / "verify" / "verify.md",
                                    output / "verify" / "verify.json")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(4)]
    assert lock.is_file() and md.read_text().startswith("# Verification passed: tiny-llama-demo")
    report = json.loads(js.read_text())
    assert report["passed"] and [i["prompt"] for i in report["inputs"]] == demo_prompts()
    figures = report["figures"]
    assert f"verify (checkpoint vs the source model's logits): 2 input(s), {figures['tokens']} tokens\n" in out
    for name, op, limit in [("max_abs_logit_error", "<=", "0.1"), ("mean_abs_logit_error", "<=", "0.01"),
                            ("mean_kl", "<=", "0.0001"), ("top1_agreement", ">=", "0.98")]:
        printed = re.search(rf"\n  {name} +(\S+)  {op} {limit} +\(default for none\)  ok\n", out)
        assert printed, (name, out)
        assert float(printed[1]) == pytest.approx(figures[name], rel=1e-3)
    assert figures["max_abs_logit_error"] < 1e-3 and figures["top1_agreement"] == 1.0  # fp16 TP2 x PP2 of fp16
    assert "\nPASS\n" in out


def test_report_summary_from_verify_json(tmp_path):
    """What `recipe demo` prints is read back from the published verify.json: each figure against
    its limit, the failed ones marked, the verdict."""
    from recipe_runner.verify.report import read_report_summary

    report = {
        "passed": False, "inputs": [{"label": "prompt 1"}, {"label": "token_ids 1"}],
        "figures": {"tokens": 9, "max_abs_logit_error": 0.5, "mean_abs_logit_error": 0.004, "mean_kl": 2e-5,
                    "top1_agreement": 1.0, "perplexity_source": 1000.0, "perplexity_checkpoint": 1001.5,
                    "max_layer_error": 0.02},
        "tolerances": {"max_abs_logit_error": 0.1, "mean_abs_logit_error": 0.01, "mean_kl": 1e-4,
                       "min_top1_agreement": 0.98, "max_layer_error": 0.01, "max_perplexity_ratio": 1.01},
        "tolerance_sources": {"max_abs_logit_error": "recipe", "mean_abs_logit_error": "default for none",
                              "mean_kl": "default for none", "min_top1_agreement": "default for none",
                              "max_layer_error": "default for none", "max_perplexity_ratio": "default for none"},
        "failures": [{"figure": "max_abs_logit_error", "value": 0.5, "limit": 0.1, "message": "..."},
                     {"figure": "max_layer_error", "value": 0.02, "limit": 0.01, "message": "...", "layer": 3}],
        "layers": {"first_jump": 3, "worst_layer": 3, "jump_factor": 3.0, "layers": []},
        "perplexity": {"windows": 2, "tokens": 62, "perplexity_source": 20.0, "perplexity_checkpoint": 20.1,
                       "perplexity_ratio": 1.005, "recovery": 0.995025},
    }
    path = tmp_path / "verify.json"
    path.write_text(json.dumps(report))
    assert read_report_summary(path).splitlines() == [
        "2 input(s), 9 tokens",
        "  max_abs_logit_error          0.5  <= 0.1      (recipe)  OUT OF TOLERANCE",
        "  mean_abs_logit_error       0.004  <= 0.01     (default for none)  ok",
        "  mean_kl                    2e-05  <= 0.0001   (default for none)  ok",
        "  top1_agreement                 1  >= 0.98     (default for none)  ok",
        "  max_layer_error             0.02  <= 0.01     (default for none)  OUT OF TOLERANCE",
        "  perplexity            source 1000, checkpoint 1002",
        "  held-out perplexity   source 20, checkpoint 20.1: ratio 1.005 <= 1.01 (default for none), recovery "
        "0.995, 62 tokens  ok",
        "  layer 3 is the first whose error stands out from the others' (worst: layer 3); verify.md has the "
        "layer-by-layer table",
        "FAIL",
    ]
