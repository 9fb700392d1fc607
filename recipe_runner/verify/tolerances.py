"""Pass/fail limits of the verify figures: the recipe's `verify.tolerances`, and per-format defaults
for every limit it leaves out.

How the defaults were chosen (each row below records its measurements):

* **Unquantized**: from the tiny seeded test models (tp 1 and 2), tight enough that a swapped q/k
  head pair, gate/up or two ranks' slices fails (tests/test_verify_corruptions.py); an exact
  conversion of SmolLM2-135M is within 7e-5 of the source's logits.
* **Quantized**: from the worst correct checkpoint of each format on a real trained model,
  SmolLM2-135M-Instruct (README, "Quantization quality on SmolLM2"; bench/quality.py: TensorRT-LLM
  rank files at tp 3 and the HF targets at tp 1, 64 calibration samples of 512 tokens, SmoothQuant
  α 0.5, AWQ and round-to-nearest at group 64, figures over the verify prompts and 512 held-out
  tokens), and from the tiny models (docs/format/trtllm-checkpoint.md §4 formulas and the quantize
  stage), whichever is worse. The margin: 2x on the max abs logit error (a maximum over positions,
  the noisiest figure), 1.5x on the mean abs error, the KL and the layer error, 1.5x on the
  perplexity increase (at least +3 %: 512 held-out tokens measure a ratio to about ±1 %); top-1
  floors 0.1 under the worst real-model figure, lower where the tiny models need it.

Two things to know when reading them:

* A 135M model is far more sensitive to quantization than the 8B–70B models users ship (4-bit
  per-channel raises its perplexity 1.7x; Llama-3.1-8B's published RTN W4A16 figure is 1.12x), so
  these defaults accept every correct checkpoint and catch gross mistakes (a wrong scale, a
  swapped tensor); a release should set `verify.tolerances` (above all `max_perplexity_ratio`)
  from a build it trusts.
* Absolute logit errors grow with the model's logit range (tiny models: |logit| < 2; SmolLM2:
  10–30), which is why the tiny models could not set the quantized defaults.

A quantized KV cache adds its own allowance on top of the weight format's limits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping

from recipe_runner.verify.metrics import Figures, PerplexityFigures
from recipe_runner.verify.trace import LayerTrace


@dataclass(frozen=True)
class Tolerances:
    max_abs_logit_error: float
    mean_abs_logit_error: float
    mean_kl: float
    min_top1_agreement: float
    max_layer_error: float  # the worst decoder layer's error on the source's inputs (verify/trace.py)
    max_perplexity_ratio: float  # checkpoint / source perplexity on verify.perplexity's dataset

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Weight formats, keyed by family (see `weight_family`). Fields: max abs / mean abs logit error, mean
# KL, min top-1, max layer error, max perplexity ratio (from held-out text, verify.perplexity). Changing a
# default changes what verify decides for an unchanged checkpoint: bump the verify stage's version
# (stages/registry.py) with it. Measurements: "tiny" = the seeded test models, "SmolLM2" = the worst
# target at tp 1 / 3 (max abs / mean abs / KL / top-1 / layer / perplexity ratio).
DEFAULTS: dict[str, Tolerances] = {
    # tiny: same dtype 1e-6 / 2e-7 / 1e-14 / 1.0 / layer 2e-7; fp16 -> bf16 rounding 0.012 / 0.0019 / 3e-6 /
    # 1.0 / layer 0.0039. The layer limit is what catches a swapped q/k head pair (layer 0.015 with logits
    # still inside their limits: 0.024 / 6e-6 / 1.0), swapped gate/up (0.15) or two ranks' slices (1.2).
    # SmolLM2, exact conversion at tp 3: 6.5e-5 / 6e-6 / 1e-11 / 1.0 / layer 2.7e-7 / 1.0000.
    "none": Tolerances(0.1, 0.01, 1e-4, 0.98, 0.01, 1.01),
    # tiny 0.031 / 0.0052 / 2.1e-5 / 0.97 / layer 0.0104; SmolLM2 1.99 / 0.19 / 0.0032 / 0.959 / 0.026 / 1.0018
    "W8A16": Tolerances(4.0, 0.3, 0.005, 0.85, 0.05, 1.03),
    # tiny 0.55 / 0.094 / 7.3e-3 / 0.59 / layer 0.18 (hf-compressed-tensors per channel, quant_model:
    # 0.85 / 0.15 / 0.018 / 0.30); SmolLM2 24.3 / 3.58 / 0.754 / 0.562 / 0.415 / 1.863 (rank file at tp 1)
    "W4A16": Tolerances(50.0, 5.4, 1.2, 0.15, 0.65, 2.3),
    # tiny, group 16 and 64: 0.67 / 0.11 / 9.7e-3 / 0.49 / layer 0.16 (HF exports, group 64: 0.99 / 0.15 /
    # 0.018 / 0.24); SmolLM2 at group 64, round-to-nearest (awq_search: false, the same quant_algo) the
    # worst: 21.3 / 3.76 / 0.54 / 0.616 / 0.31 / 1.375 (with the search: 1.165-1.276)
    "W4A16_AWQ": Tolerances(45.0, 5.7, 0.85, 0.15, 0.5, 1.6),
    # static per-tensor activation scales (per channel / per tensor weights). tiny (ModelOpt per channel,
    # plugin per token and per tensor) 0.27 / 0.033 / 9.2e-4 / 0.78 / layer 0.09; SmolLM2 at α 0.5, the
    # worst hf-compressed-tensors per channel (it smooths only q/k/v and gate/up): 32.6 / 3.40 / 0.733 /
    # 0.531 / 0.79 (per tensor, layer 11) / 1.875; rank files: 26.6 / 1.65 / 0.343 / 0.675 / 0.79 / 1.382
    "W8A8_SQ": Tolerances(66.0, 5.2, 1.1, 0.4, 1.2, 2.35),
    # dynamic per-token activation scales. SmolLM2: hf-compressed-tensors 8.38 / 0.36 / 0.0171 / 0.924 / 0.067 /
    # 1.0185; rank files (α 0.5 and auto, tp 1 and 3) up to 11.2 / 0.416 / 0.0188 / 0.937 / 0.127 / 1.003
    "W8A8_SQ_PER_TOKEN": Tolerances(23.0, 0.63, 0.03, 0.5, 0.3, 1.03),
    # tiny 0.32 / 0.047 / 1.9e-3 / 0.73 / layer 0.155 (tp 2; 0.07 at tp 1); SmolLM2 12.5 / 0.615 / 0.0379 /
    # 0.918 / 0.089 / 1.027
    "FP8": Tolerances(25.0, 0.95, 0.06, 0.5, 0.4, 1.05),
    # HF targets only (W4A4: E2M1 weights and per-16 dynamic activation blocks). tiny (quant_model; hf-modelopt
    # and hf-compressed-tensors identical, without / with FP8 KV): 1.05 / 0.156 / 0.020 / 0.41 and 0.99 /
    # 0.161 / 0.021 / 0.46; SmolLM2 19.9 / 1.97 / 0.382 / 0.681 / 0.308 / 1.502
    "NVFP4": Tolerances(40.0, 3.0, 0.6, 0.15, 0.6, 1.8),
}
# Extra allowance of a quantized KV cache: added to the errors, subtracted from the top-1 floor; set so
# that the unquantized limits plus the allowance hold the KV-only figures with the margin above.
# tiny: INT8 0.031 / 0.0036 / 1.0e-5 / 1.0 / layer 0.0093; FP8 0.080 / 0.0098 / 8.0e-5 / 1.0 / layer 0.026,
# and on the quant_model test model (the KV-only hf-modelopt export, 37 tokens) 0.10 / 0.016 / 2.1e-4 / 0.84:
# its flatter distributions flip top-1 where KL barely moves, hence the wide FP8 top-1 allowance.
# SmolLM2, KV cache alone (tp 1 and 3): INT8 7.02 / 0.334 / 0.0199 / 0.935 / 0.084 / 0.990; FP8 8.43 / 0.280 /
# 0.0101 / 0.939 / 0.054 / 1.019 (FP8 weights + FP8 KV: 7.77 / 0.668 / 0.0388 / 0.895 / 0.098 / 1.032)
KV_ALLOWANCE: dict[str, Tolerances] = {
    "INT8": Tolerances(14.0, 0.5, 0.03, 0.15, 0.12, 0.02),
    "FP8": Tolerances(17.0, 0.41, 0.016, 0.25, 0.08, 0.02),
}


def weight_family(quant_algo: str | None) -> str:
    if quant_algo is None:
        return "none"
    if quant_algo.startswith("W8A8_SQ"):  # dynamic per-token activations lose far less than static scales
        return "W8A8_SQ_PER_TOKEN" if "PER_TOKEN" in quant_algo else "W8A8_SQ"
    return quant_algo


def default_tolerances(quant_algo: str | None, kv_cache_quant_algo: str | None) -> Tolerances:
    base = DEFAULTS[weight_family(quant_algo)]
    kv = KV_ALLOWANCE.get(kv_cache_quant_algo or "")
    if kv is None:
        return base
    return Tolerances(base.max_abs_logit_error + kv.max_abs_logit_error,
                      base.mean_abs_logit_error + kv.mean_abs_logit_error,
                      base.mean_kl + kv.mean_kl,
                      max(base.min_top1_agreement - kv.min_top1_agreement, 0.0),
                      base.max_layer_error + kv.max_layer_error,
                      base.max_perplexity_ratio + kv.max_perplexity_ratio)


def describe_default(quant_algo: str | None, kv_cache_quant_algo: str | None) -> str:
    text = f"default for {weight_family(quant_algo)}"
    return text + (f" + {kv_cache_quant_algo} KV cache" if kv_cache_quant_algo else "")


def resolve_tolerances(overrides: Mapping[str, float], quant_algo: str | None, kv_cache_quant_algo: str | None,
                       given_by: str = "given") -> tuple[Tolerances, dict[str, str]]:
    """The limits to apply and, per limit, where it came from (`given_by` or the default's name)."""
    default = default_tolerances(quant_algo, kv_cache_quant_algo)
    unknown = set(overrides) - {f.name for f in fields(Tolerances)}
    if unknown:
        raise ValueError(f"unknown tolerances: {sorted(unknown)}")
    merged = {**default.to_dict(), **{k: float(v) for k, v in overrides.items()}}
    origin = describe_default(quant_algo, kv_cache_quant_algo)
    sources = {name: (given_by if name in overrides else origin) for name in merged}
    return Tolerances(**merged), sources


@dataclass(frozen=True)
class Failure:
    figure: str
    value: float
    limit: float
    layer: int | None = None  # for max_layer_error: the worst layer

    @property
    def limit_name(self) -> str:
        renamed = {"top1_agreement": "min_top1_agreement", "perplexity_ratio": "max_perplexity_ratio"}
        return renamed.get(self.figure, self.figure)

    @property
    def message(self) -> str:
        if self.figure == "top1_agreement":
            return f"top1_agreement {self.value:.4g} < min_top1_agreement {self.limit:.4g}"
        where = f" (decoder layer {self.layer})" if self.layer is not None else ""
        return f"{self.figure} {self.value:.4g}{where} > {self.limit:.4g}"

    def to_dict(self) -> dict:
        out = {"figure": self.figure, "value": self.value, "limit": self.limit, "message": self.message}
        return out if self.layer is None else {**out, "layer": self.layer}


def check(figures: Figures, limits: Tolerances, trace: LayerTrace | None = None,
          perplexity: PerplexityFigures | None = None) -> list[Failure]:
    """Every figure outside its limit (NaN counts as outside): the logit figures, the worst layer's
    error, and the perplexity ratio when verify.perplexity gave a dataset."""
    failures = []
    for figure in ("max_abs_logit_error", "mean_abs_logit_error", "mean_kl"):
        value, limit = getattr(figures, figure), getattr(limits, figure)
        if not value <= limit:
            failures.append(Failure(figure, value, limit))
    if not figures.top1_agreement >= limits.min_top1_agreement:
        failures.append(Failure("top1_agreement", figures.top1_agreement, limits.min_top1_agreement))
    if trace is not None and not trace.max_layer_error <= limits.max_layer_error:
        failures.append(Failure("max_layer_error", trace.max_layer_error, limits.max_layer_error, trace.worst_layer))
    if perplexity is not None and not perplexity.perplexity_ratio <= limits.max_perplexity_ratio:
        failures.append(Failure("perplexity_ratio", perplexity.perplexity_ratio, limits.max_perplexity_ratio))
    return failures
