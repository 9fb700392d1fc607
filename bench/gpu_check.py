"""GPU checks (issue 20): calibrate and verify on a device give the figures of CPU, the same bytes
across runs, and what they cost. Nothing in the suite needs a GPU; run this where there is one.

    python bench/gpu_check.py [--device cuda] [--algos fp8,w8a8_sq_per_channel_per_token,w4a16_awq,auto]
                              [--work DIR]

Per algo, on a tiny seeded LLaMA (hidden 128, 4 layers, with a tokenizer; recipe_runner.demo), one
recipe (calibration 12 samples x 24 tokens, TP 2 rank files, verify on two prompts) is built with the
`recipe` command as a user runs it: once with `--device cpu`, twice with `--device <device>`, each
into its own empty cache. It prints, per algo: the verify figures on CPU and on the device and
their difference, whether the two device builds wrote byte-identical calibration statistics
(determinism: deterministic algorithms, fixed reduction order) and checkpoints, and each build's
calibrate and verify seconds. `auto` is w8a8_sq_per_channel with smoothquant_alpha auto (both search
steps on the device). With --device cpu it checks the script itself (and CPU determinism).
For the per-layer timings of 70B-shaped layers: bench/quantize.py --device cuda.
Exit status 1 when a device build fails, differs between its two runs, or verify fails.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ALGOS = {"fp8": {"algo": "fp8"}, "w8a8_sq_per_channel_per_token": {"algo": "w8a8_sq_per_channel_per_token"},
         "w4a16_awq": {"algo": "w4a16_awq", "group_size": 64}, "nvfp4": {"algo": "nvfp4"},
         "auto": {"algo": "w8a8_sq_per_channel", "smoothquant_alpha": "auto"}}
FIGURES = ("max_abs_logit_error", "mean_kl", "top1_agreement")


def recipe(model: Path, calib: Path, quantization: dict, out: Path) -> dict:
    targets = ["hf-modelopt"] if quantization["algo"] == "nvfp4" else ["trtllm-checkpoint"]
    return {"recipe_version": 1, "name": "gpu-check", "source": {"path": str(model), "dtype": "float16"},
            "mapping": {"tp_size": 1 if targets == ["hf-modelopt"] else 2},
            "quantization": {**quantization, "calibration": {"dataset": str(calib), "num_samples": 12,
                                                             "max_seq_len": 24, "batch_size": 4}},
            "output": {"dir": str(out), "targets": targets},
            "verify": {"prompts": ["The capital of France is", "def fibonacci(n):"]}}


def build(path: Path, device: str, cache: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", "from recipe_runner.cli import main; main()", "build", str(path), "--device", device,
                          "--cache-dir", str(cache), "--format", "json"], capture_output=True, text=True)
    if run.returncode not in (0, 1) or not run.stdout.strip():
        return {"failed": (run.stderr or run.stdout)[-2000:]}
    document = json.loads(run.stdout)
    result = document["recipes"][0]
    if result["status"] != "built":
        return {"failed": result.get("message", "not built")}
    out = Path(result["outputs"]["dir"])
    verify = next(out.glob("verify/**/verify.json"))
    seconds = {s["name"]: s.get("seconds") for s in result.get("stages", [])}
    return {"verify": json.loads(verify.read_text()), "out": out, "seconds": seconds,
            "stats": _stats_bytes(cache)}


def _stats_bytes(cache: Path) -> bytes:
    """The calibrate artifact's statistics and metadata, as written."""
    found = sorted(cache.rglob("statistics.safetensors"))
    return b"".join(p.read_bytes() + (p.parent / "calibration.json").read_bytes() for p in found)


def checkpoint_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*.safetensors")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--algos", default="fp8,w8a8_sq_per_channel_per_token,w4a16_awq,auto")
    ap.add_argument("--work", help="keep the models, recipes and outputs here (default: a temp dir)")
    args = ap.parse_args()

    import torch

    from recipe_runner.demo import make_tiny_llama

    print(f"torch {torch.__version__}; CUDA devices: "
          + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"))
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    model = make_tiny_llama(work / "model", hidden_size=128, intermediate_size=256, with_tokenizer=True)
    calib = work / "calib.txt"
    from recipe_runner.demo import _CORPUS
    calib.write_text("\n".join(f"{line} ({i})".replace("\n", " ") for i in range(3) for line in _CORPUS) + "\n")
    ok = True
    print("| algo | verify cpu (max abs, KL, top-1) | verify device | device runs identical (stats, checkpoint) "
          "| calibrate s cpu / device | verify s cpu / device |\n|---|---|---|---|---|---|")
    for name in args.algos.split(","):
        path = work / f"{name}.yaml"
        runs = {}
        for label, device in (("cpu", "cpu"), ("device", args.device), ("again", args.device)):
            path.write_text(json.dumps(recipe(model, calib, ALGOS[name], work / f"out-{name}-{label}")))
            runs[label] = build(path, device, work / f"cache-{name}-{label}")
        failed = [f"{k}: {r['failed']}" for k, r in runs.items() if "failed" in r]
        if failed:
            ok = False
            print(f"| {name} | FAILED: {' / '.join(failed)[:400]} | | | | |")
            continue
        cpu, dev, again = runs["cpu"], runs["device"], runs["again"]
        same = (dev["stats"] == again["stats"], checkpoint_bytes(dev["out"]) == checkpoint_bytes(again["out"]))
        ok &= all(same) and dev["verify"]["passed"]

        def figures(r: dict) -> str:
            return ", ".join(f"{r['verify']['figures'][f]:.3g}" for f in FIGURES)

        def secs(stage: str) -> str:
            return " / ".join(f"{r['seconds'].get(stage) or 0:.2f}" for r in (cpu, dev))

        print(f"| {name} | {figures(cpu)} | {figures(dev)} ({'pass' if dev['verify']['passed'] else 'FAIL'}) "
              f"| {same[0]}, {same[1]} | {secs('calibrate')} | {secs('verify')} |", flush=True)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
