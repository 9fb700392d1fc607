"""Benchmark: calibrate + quantize + shard (and the Hugging Face exports) of a synthetic model with
Llama-3.1-70B shapes.

    python bench/quantize.py [--layers 1] [--tp 2] [--samples 16] [--seq-len 128]
                             [--algos w8a16,w8a8_sq_per_channel_per_token]
                             [--exports hf-modelopt:nvfp4,hf-compressed-tensors:w4a16_awq] [--alpha auto]
                             [--device cpu|cuda|cuda:N]

Writes the bf16 HF-style source of bench/convert.py (hidden 8192, intermediate 28672, 64 heads,
8 KV heads, vocab 128256; --layers layers) plus a tiny tokenizer (recipe_runner.demo) and a
calibration .txt into a temp dir under /tmp. Then, per algo, child processes run the stages:
calibrate when the algo needs it, then quantize and shard in one process (as `recipe build` runs them:
torch is imported once) for --algos, or the export stage of the target for --exports; each is timed, with the child's peak RSS (VmHWM), its CPU time over its
wall (cores kept busy) and the 1-minute load average at its end (what else ran). Targets: peak RSS
under one decoder layer's float32 weights + 2 GiB; quantize + shard (and each export) within 1.3 x
`cp -r` of the source scaled by (bytes written / source bytes), cp alternated with the jobs (best of
--repeat before the jobs and after them) and every timing from a `sync` to a `sync`; the calibration
(a forward pass over the samples, no bytes to move) is reported beside, not counted. `--alpha auto`
runs SmoothQuant's α search in the calibrate phase of the SmoothQuant algos (smoothquant_alpha: auto).
`--device cuda` calibrates on the GPU (as `recipe build --device cuda`) and adds the device's peak
allocated memory to the calibrate line. Removes everything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import SHAPES, SCALED_TARGET, dir_bytes, make_source, timed, warm  # noqa: E402  (bench/convert.py)

GiB = 1024**3
CALIBRATED = {"w4a16_awq", "w8a8_sq_per_channel", "w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor", "fp8",
              "nvfp4"}

CHILD = """
import json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
src = Path(args["src"])
stats_dir = Path(args["stats"]) if args.get("stats") else None
alpha = args["alpha"] if args["algo"].startswith("w8a8_sq") else 0.5
walls = {}
started = time.perf_counter()
for phase in args["phases"]:  # in one process, as `recipe build` runs them: torch imported once
    t = time.perf_counter()
    if phase == "calibrate":
        from recipe_runner.stages.calibrate import CalibrationSettings, calibrate
        from recipe_runner.quant.sq_auto import AlphaSearch, is_auto
        family = (["awq"] if args["algo"] == "w4a16_awq" else ["amax"] if args["algo"] in ("fp8", "nvfp4")
                  else ["smoothquant"])
        search = AlphaSearch(args["algo"]) if is_auto(args["alpha"]) and family == ["smoothquant"] else None
        settings = CalibrationSettings("calib.txt", Path(args["calib"]), num_samples=args["samples"],
                                       max_seq_len=args["seq_len"], batch_size=args["batch"], statistics=tuple(family),
                                       group_size=128, smoothquant_search=search)
        calibrate(src, settings, stats_dir, devices=(args["device"],))
    elif phase == "quantize":
        from recipe_runner.calibration.stats import read_stats
        from recipe_runner.quant.settings import QuantSettings
        from recipe_runner.stages.quantize import quantize_checkpoint
        stats = read_stats(stats_dir) if stats_dir else None
        quantize_checkpoint(src, stats, QuantSettings(args["algo"], smoothquant_alpha=alpha), "bfloat16",
                            Path(args["quant"]))
    elif phase == "shard":
        from recipe_runner.hf.config import read_model_config
        from recipe_runner.hf.layered import open_checkpoint
        from recipe_runner.stages.shard_plan import plan_rank_tensors
        from recipe_runner.stages.quantized import read_artifact
        from recipe_runner.stages.shard import write_checkpoint
        from recipe_runner.trtllm.mapping import ParallelMapping
        dirs = (Path(args["quant"]), src)
        manifest = plan_rank_tensors(read_model_config(src), open_checkpoint(dirs), mapping=ParallelMapping(args["tp"]),
                                     dtype="bfloat16", quantized=read_artifact(Path(args["quant"])))
        write_checkpoint(manifest, dirs, Path(args["ckpt"]))
    else:
        from recipe_runner.calibration.stats import read_stats
        from recipe_runner.hfexport.export import export_checkpoint
        from recipe_runner.quant.settings import QuantSettings
        stats = read_stats(stats_dir) if stats_dir else None
        export_checkpoint(src, stats, QuantSettings(args["algo"], smoothquant_alpha=alpha), args["target"], "bfloat16",
                          Path(args["export"]))
    walls[phase] = time.perf_counter() - t
wall = time.perf_counter() - started
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
import os
import torch
device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
print(json.dumps({"wall": wall, "walls": walls, "vmhwm": hwm, "cpu": sum(os.times()[:2]),
                  "device_peak": device_peak}))
"""


def run_phase(**args) -> dict:
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], check=True, capture_output=True, text=True)
    subprocess.run(["sync"], check=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["process"] = time.perf_counter() - started
    stats["load"] = os.getloadavg()[0]  # 1-minute load average at the end: what else was running
    return stats


def cp_time(src: Path, root: Path) -> float:
    wall, _ = timed([["sync"]], [["cp", "-r", str(src), str(root / "cp")]], [["sync"]])
    shutil.rmtree(root / "cp")
    return wall


def scaled_line(what: str, wall: float, written: int, size: int, cp_wall: float) -> str:
    scaled = (wall / cp_wall) / (written / size)
    return (f"  {what}: {wall:.2f} s for {written / 1e9:.2f} GB written ({written / size:.2f} x source, "
            f"{written / wall / 1e9:.2f} GB/s): {wall / cp_wall:.2f} x cp, scaled {scaled:.2f} "
            f"(target <= {SCALED_TARGET}: {'MET' if scaled <= SCALED_TARGET else 'MISSED'})")


def layer_fp32_bytes() -> int:
    H, I = SHAPES["hidden_size"], SHAPES["intermediate_size"]
    kv = SHAPES["num_key_value_heads"] * SHAPES["head_dim"]
    return (2 * H * H + 2 * kv * H + 3 * I * H) * 4


def calibration_text(samples: int) -> str:
    from recipe_runner.demo import _CORPUS

    return "\n".join(" ".join(_CORPUS[(i + j) % len(_CORPUS)].replace("\n", " ") for j in range(8))
                     for i in range(samples)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--algos", default="w8a16,w8a8_sq_per_channel_per_token",
                    help="algos for the trtllm-checkpoint target (quantize + shard)")
    ap.add_argument("--exports", default="hf-modelopt:nvfp4,hf-compressed-tensors:w4a16_awq",
                    help="target:algo pairs for the Hugging Face targets (export stage)")
    ap.add_argument("--alpha", default="0.5", help="smoothquant_alpha of the SmoothQuant algos: a number or auto")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--device", default="cpu", help="where calibration computes: cpu, cuda, cuda:N")
    ap.add_argument("--repeat", type=int, default=2, help="cp runs; the best one counts")
    args = ap.parse_args()
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)

    from recipe_runner.demo import make_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="recipe-bench-quant-", dir=args.tmp))
    try:
        src = root / "hf"
        t = time.perf_counter()
        size = make_source(src, args.layers)
        warm(src)
        make_tiny_tokenizer(src)
        (root / "calib.txt").write_text(calibration_text(args.samples))
        print(f"source: {size / GiB:.2f} GiB bf16, {args.layers} layer(s) of Llama-3.1-70B shape, "
              f"generated in {time.perf_counter() - t:.1f} s; calibration: {args.samples} samples x <= "
              f"{args.seq_len} tokens, batch {args.batch}; calibration on {args.device}")
        target = layer_fp32_bytes() + 2 * GiB
        cp_walls = [cp_time(src, root) for _ in range(args.repeat)]
        print(f"cp -r of the source: {', '.join(f'{w:.2f}' for w in cp_walls)} s", flush=True)
        peak_all = 0
        results: list[tuple[str, float, int]] = []
        jobs = [("trtllm-checkpoint", a) for a in args.algos.split(",") if a]
        jobs += [tuple(pair.split(":")) for pair in args.exports.split(",") if pair]
        for output_target, algo in jobs:
            out = root / f"{output_target}-{algo}"
            out.mkdir()
            phases = {}
            common = {"algo": algo, "src": str(src), "alpha": alpha, "stats": "", "device": args.device}
            if algo in CALIBRATED:
                (out / "stats").mkdir()
                common["stats"] = str(out / "stats")
                phases["calibrate"] = run_phase(phases=["calibrate"], calib=str(root / "calib.txt"), samples=args.samples,
                                                seq_len=args.seq_len, batch=args.batch, **common)
            if output_target == "trtllm-checkpoint":
                (out / "quant").mkdir()
                phases["quantize + shard"] = run_phase(phases=["quantize", "shard"], quant=str(out / "quant"), tp=args.tp,
                                                       ckpt=str(out / "ckpt"), **common)
                print(f"{algo} (tp={args.tp}):")
            else:
                (out / "export").mkdir()
                phases["export"] = run_phase(phases=["export"], target=output_target, export=str(out / "export"),
                                             **common)
                print(f"{algo} as {output_target}:")
            for name, s in phases.items():
                per_layer = f"   {s['wall'] / args.layers:7.2f} s per layer" if name == "calibrate" else ""
                if s.get("device_peak"):
                    per_layer += f"   {args.device} peak {s['device_peak'] / GiB:.2f} GiB"
                inside = ", ".join(f"{k} {v:.2f} s" for k, v in s["walls"].items()) if len(s["walls"]) > 1 else ""
                print(f"  {name:<16} wall {s['wall']:7.2f} s (process {s['process']:6.2f} s{'; ' + inside if inside else ''})"
                      f"   peak RSS {s['vmhwm'] / GiB:5.2f} GiB   CPU {s['cpu'] / s['process']:.2f} cores   "
                      f"load {s['load']:.1f}{per_layer}", flush=True)
                peak_all = max(peak_all, s["vmhwm"])
            moved = [n for n in phases if n != "calibrate"]
            results.append((f"{algo} as {output_target}" if output_target != "trtllm-checkpoint"
                            else f"{algo} quantize + shard (tp={args.tp})",
                            sum(phases[n]["process"] for n in moved),
                            sum(dir_bytes(out / d) for d in ("quant", "ckpt", "export") if (out / d).exists())))
            shutil.rmtree(out)
        cp_walls += [cp_time(src, root) for _ in range(args.repeat)]
        cp_wall = min(cp_walls)
        print(f"cp -r of the source, after the jobs: {', '.join(f'{w:.2f}' for w in cp_walls[args.repeat:])} s; "
              f"best {cp_wall:.2f} s ({size / cp_wall / 1e9:.2f} GB/s)")
        print("bytes-moving phases (process wall, sync to sync) against cp scaled by bytes written:")
        for what, wall, written in results:
            print(scaled_line(what, wall, written, size, cp_wall))
        print(f"target peak RSS < one layer in float32 ({layer_fp32_bytes() / GiB:.2f} GiB) + 2 GiB = "
              f"{target / GiB:.2f} GiB: {'MET' if peak_all < target else 'NOT MET'} (max {peak_all / GiB:.2f} GiB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
