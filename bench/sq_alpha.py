"""Benchmark: `smoothquant_alpha: auto` against every fixed α of its grid, on held-out text (issue 19).

    python bench/sq_alpha.py [--algos w8a8_sq_per_channel,...] [--samples 64] [--seq-len 512]
                             [--held-out-tokens 4096] [--markdown FILE]

On SmolLM2-135M-Instruct (recipe_runner/real_models.py, offline) with Python's pydoc split into
calibration and held-out text (disjoint by paragraph), per SmoothQuant algo: the calibrate stage's own
code runs the α search (both steps, quant/sq_auto.py) on the calibration text, then every candidate (the
per-layer choice and each grid α for the whole model) is scored on the held-out text by the same W8A8
simulation (calibration/alpha_select.py candidate_losses), in verify.perplexity's windows. It prints each candidate's held-out perplexity,
the one `auto` kept (chosen on calibration text only) and whether it is at least as good as the best
fixed α of the grid on held-out text — the target of issue 19 — with the gap (the best fixed α is
picked on the held-out text itself, an oracle). bench/quality.py measures the
checkpoints themselves, through verify.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

ALGOS = ("w8a8_sq_per_channel", "w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor")


def held_out_batches(model_dir: Path, text: Path, tokens: int, seq_len: int):
    """verify.perplexity's own windows of the held-out text (its first `tokens` tokens in windows of
    `seq_len`, recipe_runner/verify/inputs.py), one window per batch."""
    from recipe_runner.calibration.tokens import make_batches
    from recipe_runner.hf.config import read_model_config
    from recipe_runner.verify.inputs import PerplexityText, perplexity_windows

    windows = perplexity_windows(model_dir, PerplexityText(text.name, text, num_tokens=tokens, seq_len=seq_len))
    return make_batches([list(w.token_ids) for w in windows], 1, read_model_config(model_dir).vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (pydoc paragraphs)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--held-out-tokens", type=int, default=4096)
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args()

    from recipe_runner.calibration.alpha_select import candidate_losses
    from recipe_runner.quant.algorithms import SMOOTHQUANT_STATISTICS
    from recipe_runner.quant.sq_auto import PER_LAYER, AlphaSearch
    from recipe_runner.real_models import locate_smollm2, prepare_smollm2, prepared_dir, pydoc_text_split
    from recipe_runner.stages.calibrate import CalibrationSettings, calibrate

    source = locate_smollm2()
    model_dir = prepare_smollm2(prepared_dir(source), wheel=source.wheel)
    work = Path(tempfile.mkdtemp(prefix="bench-sq-alpha-"))
    calib, held_out = pydoc_text_split(work / "text")
    batches = held_out_batches(model_dir, held_out, args.held_out_tokens, args.seq_len)
    lines = [f"SmolLM2-135M-Instruct; calibration: {args.samples} samples of the pydoc split, max_seq_len "
             f"{args.seq_len}, seed 0; held-out: {sum(b.tokens for b in batches)} tokens",
             "", "| algo | auto kept | auto held-out ppl | best fixed α (held-out) | its ppl | α 0.5 ppl "
             "| per-layer choice ppl | calibration s | auto vs best fixed |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    met_all = True
    for algo in args.algos.split(","):
        settings = CalibrationSettings(calib.name, calib, num_samples=args.samples, max_seq_len=args.seq_len, seed=0,
                                       batch_size=1, statistics=(SMOOTHQUANT_STATISTICS,),
                                       smoothquant_search=AlphaSearch(algo))
        started = time.perf_counter()
        stats = calibrate(model_dir, settings)
        seconds = time.perf_counter() - started
        held = dict(candidate_losses(model_dir, batches, stats).losses)
        ppl = {c: math.exp(loss) for c, loss in held.items()}
        kept = stats.alpha_selection.chosen
        fixed = {c: p for c, p in ppl.items() if c != PER_LAYER}
        best = min(fixed, key=lambda c: (fixed[c], c))
        gap = ppl[kept] / fixed[best] - 1
        met = gap <= 0
        met_all &= met
        print(f"{algo}: calibration losses {dict(stats.alpha_selection.losses)}")
        print(f"{algo}: held-out perplexity {ppl}")
        lines.append(f"| {algo} | {kept} | {ppl[kept]:.3f} | {best} | {fixed[best]:.3f} | {ppl[0.5]:.3f} "
                     f"| {ppl[PER_LAYER]:.3f} | {seconds:.0f} | {'met' if met else 'MISSED'} ({gap:+.2%}) |")
    table = "\n".join(lines)
    print(table)
    print("target (auto at least as good as the best fixed alpha of the grid, held-out):", "met" if met_all else "MISSED")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
