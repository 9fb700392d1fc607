"""Benchmark: a 3-variant matrix of the 70B-shaped synthetic model, as one build versus three.

    python bench/matrix.py [--layers 1] [--field mapping.tp_size --values 1,2,4] [--jobs 3]

Makes the synthetic Llama-3.1-70B-shaped source of bench/convert.py under /tmp, then times
  separate: each variant as its own recipe, built cold with its own fresh cache, one after another
  matrix:   one recipe with `matrix: {FIELD: VALUES}`, built cold with `--jobs JOBS` (shared stages once)
and prints both, the ratio matrix / separate and whether it meets the target (< 0.6).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import make_source  # noqa: E402  (the sibling benchmark's synthetic model)

TARGET = 0.6


def timed_build(recipe: Path, cache: Path, *args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "recipe_runner.cli", "build", str(recipe), "--cache-dir", str(cache),
                           *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - started


def _parse(value: str):
    return yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--field", default="mapping.tp_size")
    parser.add_argument("--values", default="1,2,4")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--extra", default="", help="YAML merged into every recipe, e.g. a calibration section")
    args = parser.parse_args()
    values = [_parse(v) for v in args.values.split(",")]
    work = Path(tempfile.mkdtemp(prefix="recipe-bench-matrix-", dir="/tmp"))
    try:
        model = work / "model"
        make_source(model, args.layers)
        base = {"recipe_version": 1, "source": {"path": str(model)}, **(yaml.safe_load(args.extra) or {})}
        separate = 0.0
        for value in values:
            recipe = dict(base, name=f"separate-{value}", output={"dir": str(work / f"separate-{value}")})
            *parents, leaf = args.field.split(".")
            node = recipe
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
            path = work / f"separate-{value}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            separate += timed_build(path, work / f"cache-{value}")
        matrix_path = work / "matrix.yaml"
        matrix_path.write_text(yaml.safe_dump(dict(base, name="matrix", output={"dir": str(work / "matrix")},
                                                   matrix={args.field: values})))
        together = timed_build(matrix_path, work / "cache-matrix", "--jobs", str(args.jobs))
        print(f"model: {args.layers} layer(s) of Llama-3.1-70B shape; variants {args.field} = {values}")
        print(f"three separate cold builds: {separate:8.2f} s")
        print(f"one matrix build (--jobs {args.jobs}): {together:8.2f} s")
        print(f"matrix / separate: {together / separate:.3f} (target < {TARGET}: "
              f"{'met' if together / separate < TARGET else 'NOT met'})")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
