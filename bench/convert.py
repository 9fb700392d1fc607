"""Benchmark: convert a synthetic model with Llama-3.1-70B shapes, compare against `cp -r`.

    python bench/convert.py [--layers 2] [--tp 4] [--workers 1] [--parallel-embedding]

Writes a bf16 HF-style checkpoint (hidden 8192, intermediate 28672, 64 heads, 8 KV heads, vocab
128256; only --layers layers) into a temp dir under /tmp, tensor by tensor with the streaming
writer (data: one seeded random block repeated, so generation is cheap). Then, in the same run:
`cp -r` of the source directory and the conversion in a child process (its own peak RSS is
read from /proc/self/status VmHWM and ru_maxrss), alternated --repeat times, best of each.
Prints the figures, the targets and whether they are met, and removes everything it wrote.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from recipe_runner.io.safetensors_writer import SafetensorsStreamWriter, TensorSpec

GiB = 1024**3
SHAPES = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
              num_attention_heads=64, num_key_value_heads=8, head_dim=128)
SHARD_BYTES = 5 * 10**9  # like HF's default 5 GB shards


def hf_tensor_specs(layers: int) -> list[TensorSpec]:
    H, I, V = SHAPES["hidden_size"], SHAPES["intermediate_size"], SHAPES["vocab_size"]
    kv = SHAPES["num_key_value_heads"] * SHAPES["head_dim"]
    bf16 = torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", bf16, (V, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", bf16, (H,)),
            TensorSpec(p + "self_attn.q_proj.weight", bf16, (H, H)),
            TensorSpec(p + "self_attn.k_proj.weight", bf16, (kv, H)),
            TensorSpec(p + "self_attn.v_proj.weight", bf16, (kv, H)),
            TensorSpec(p + "self_attn.o_proj.weight", bf16, (H, H)),
            TensorSpec(p + "post_attention_layernorm.weight", bf16, (H,)),
            TensorSpec(p + "mlp.gate_proj.weight", bf16, (I, H)),
            TensorSpec(p + "mlp.up_proj.weight", bf16, (I, H)),
            TensorSpec(p + "mlp.down_proj.weight", bf16, (H, I)),
        ]
    specs += [TensorSpec("model.norm.weight", bf16, (H,)),
              TensorSpec("lm_head.weight", bf16, (V, H))]
    return specs


def make_source(model_dir: Path, layers: int, seed: int = 0) -> int:
    """Write config.json + sharded safetensors + index; returns the bytes of tensor data."""
    model_dir.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "num_hidden_layers": layers, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", **SHAPES}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    block = (torch.randn(8 * 1024 * 1024, generator=torch.Generator().manual_seed(seed)) * 0.02
             ).to(torch.bfloat16)  # 16 MiB, repeated
    shards: list[list[TensorSpec]] = [[]]
    for spec in hf_tensor_specs(layers):
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + spec.nbytes > SHARD_BYTES:
            shards.append([])
        shards[-1].append(spec)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsStreamWriter(model_dir / name, shard, {"format": "pt"}) as w:
            for spec in w.layout.order:
                numel = spec.nbytes // 2
                blocks = (block[: min(block.numel(), numel - i)]
                          for i in range(0, numel, block.numel()))
                w.write_blocks(spec.name, blocks)
                weight_map[spec.name] = name
                total += spec.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


CHILD = """
import json, resource, sys, time
from recipe_runner.api import convert
src, out, tp, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
par = sys.argv[5] == "1"
t = time.perf_counter()
convert(src, out, tp_size=tp, workers=workers, use_parallel_embedding=par)
wall = time.perf_counter() - t
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"wall": wall, "vmhwm": hwm,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "ru_maxrss_children":
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def timed(before: list[list[str]], commands: list[list[str]], after: list[list[str]]):
    """Run `before` untimed, then time `commands` + `after`; returns (seconds, last result)."""
    for cmd in before:
        subprocess.run(cmd, check=True)
    t = time.perf_counter()
    res = None
    for cmd in commands:
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    for cmd in after:
        subprocess.run(cmd, check=True)
    return time.perf_counter() - t, res


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--parallel-embedding", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="cp/convert pairs; best of each")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--no-sync", dest="sync", action="store_false",
                    help="stop the clocks before the final sync (page-cache speed)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="recipe-bench-", dir=args.tmp))
    try:
        src = root / "hf"
        t = time.perf_counter()
        src_bytes = make_source(src, args.layers)
        print(f"source: {src_bytes / GiB:.2f} GiB of bf16 tensors, {args.layers} layers, "
              f"generated in {time.perf_counter() - t:.1f} s")
        largest = max(s.nbytes for s in hf_tensor_specs(args.layers))

        # Both timed phases start from `sync` and, unless --no-sync, end with `sync`: the time
        # until the bytes are on disk, which is what a conversion larger than RAM sees anyway.
        # This VM's page cache / disk timings vary a lot from run to run, so cp and the
        # conversion alternate --repeat times and the best time of each is compared.
        end_sync = [["sync"]] if args.sync else []
        child = [sys.executable, "-c", CHILD, str(src), str(root / "ckpt"), str(args.tp),
                 str(args.workers), "1" if args.parallel_embedding else "0"]
        cp_walls, conv_walls, runs = [], [], []
        for _ in range(args.repeat):
            cp_walls.append(timed([["sync"]], [["cp", "-r", str(src), str(root / "cp")]],
                                  end_sync)[0])
            shutil.rmtree(root / "cp")
            shutil.rmtree(root / "ckpt", ignore_errors=True)
            wall, res = timed([["sync"]], [child], end_sync)
            conv_walls.append(wall)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        cp_wall, conv_wall = min(cp_walls), min(conv_walls)
        stats = runs[conv_walls.index(conv_wall)]
        out_bytes = dir_bytes(root / "ckpt")
        peak = max(max(r["vmhwm"], r["ru_maxrss"], r["ru_maxrss_children"]) for r in runs)

        rss_target = 2 * largest + GiB
        wall_target = 1.5 * cp_wall
        clock = "incl. final sync" if args.sync else "page cache, no final sync"
        print(f"convert tp={args.tp} workers={args.workers} "
              f"parallel_embedding={args.parallel_embedding} ({clock})")
        print(f"  wall time        {conv_wall:.2f} s (process incl. Python/torch start-up; "
              f"convert() itself {stats['wall']:.2f} s)")
        print(f"  peak RSS         {peak / GiB:.2f} GiB over all runs (this run: VmHWM "
              f"{stats['vmhwm'] / GiB:.2f}, workers' max {stats['ru_maxrss_children'] / GiB:.2f})")
        print(f"  written          {out_bytes / GiB:.2f} GiB ({out_bytes / src_bytes:.2f} x "
              f"source), {out_bytes / conv_wall / GiB:.2f} GiB/s")
        print(f"  all runs         {', '.join(f'{w:.2f}' for w in conv_walls)} s")
        print(f"cp -r source       {cp_wall:.2f} s ({src_bytes / cp_wall / GiB:.2f} GiB/s); "
              f"all runs {', '.join(f'{w:.2f}' for w in cp_walls)} s")
        print(f"ratio convert/cp   {conv_wall / cp_wall:.2f} (per byte written: "
              f"{(conv_wall / out_bytes) / (cp_wall / src_bytes):.2f})")
        print(f"target peak RSS < 2 x largest tensor ({largest / GiB:.2f} GiB) + 1 GiB = "
              f"{rss_target / GiB:.2f} GiB: {'MET' if peak < rss_target else 'NOT MET'}")
        print(f"target wall <= 1.5 x cp = {wall_target:.2f} s: "
              f"{'MET' if conv_wall <= wall_target else 'NOT MET'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
