"""Pass/fail limits of the verify figures: the recipe's `verify.tolerances`, and per-format defaults
for every limit it leaves out.

How the defaults were chosen: from the worst figures a correct checkpoint of each format gives
on the tiny seeded test models (tp 1 and 2; checkpoints from the formulas of
docs/format/trtllm-checkpoint.md §4 in tests/quantized_checkpoints.py and from the quantize stage;
the measurements are in the comments below, as max abs / mean abs / mean KL / top-1), with a margin of 3–10x on the
errors, raised where production builds of the format are known to need more. Two things to
know when reading them:

* KL divergence (and, on real models, top-1 agreement) is what catches layout mistakes: on a
  real model a swapped q/k, gate/up or rank gives a KL far above 0.1 and top-1 near 0. The tiny
  random models have almost flat next-token distributions (perplexity ≈ vocabulary size), so
  their top-1 flips at the slightest noise; that is why the quantized top-1 floors are low.
* Absolute logit errors grow with the model's logit range (tiny models: |logit| < 2; real
  models: 10–30). For large quantized models, set `verify.tolerances.max_abs_logit_error` and
  `mean_abs_logit_error` from a build you trust.

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
# KL, min top-1, max layer error, max perplexity ratio (the last from held-out text, verify.perplexity). Changing a default changes what verify
# decides for an unchanged checkpoint: bump the verify stage's version (stages/registry.py) with it.
DEFAULTS: dict[str, Tolerances] = {
    # same dtype: 1e-6 / 2e-7 / 1e-14 / 1.0 / layer 2e-7; fp16 -> bf16 rounding: 0.012 / 0.0019 / 3e-6 / 1.0 /
    # layer 0.0039. The layer limit is what catches a swapped q/k head pair (layer 0.015 with logits
    # still inside their limits: 0.024 / 6e-6 / 1.0), swapped gate/up (0.15) or two ranks' slices (1.2).
    "none": Tolerances(0.1, 0.01, 1e-4, 0.98, 0.01, 1.01),
    # 0.031 / 0.0052 / 2.1e-5 / 0.97 / layer 0.0104
    "W8A16": Tolerances(0.25, 0.03, 1e-3, 0.85, 0.05, 1.05),
    # 0.55 / 0.094 / 7.3e-3 / 0.59 / layer 0.18; hf-compressed-tensors per-channel int4 (quant_model):
    # 0.85 / 0.15 / 0.018 / 0.30
    "W4A16": Tolerances(2.0, 0.3, 0.03, 0.15, 0.5, 1.5),
    # group 16 and 64: 0.67 / 0.11 / 9.7e-3 / 0.49 / layer 0.16; HF exports, group 64: 0.99 / 0.15 / 0.018 / 0.24
    "W4A16_AWQ": Tolerances(2.0, 0.3, 0.03, 0.15, 0.5, 1.5),
    # ModelOpt per-channel, plugin per-token and per-tensor: 0.27 / 0.033 / 9.2e-4 / 0.78 / layer 0.09
    "W8A8_SQ": Tolerances(1.0, 0.15, 0.02, 0.5, 0.3, 1.5),
    # 0.32 / 0.047 / 1.9e-3 / 0.73 / layer 0.155 (tp 2; 0.07 at tp 1)
    "FP8": Tolerances(1.0, 0.15, 0.01, 0.5, 0.4, 1.1),
    # HF targets only (W4A4: E2M1 weights and per-16 dynamic activation blocks). hf-modelopt and
    # hf-compressed-tensors give identical figures, without / with FP8 KV: 1.05 / 0.156 / 0.020 / 0.41 and
    # 0.99 / 0.161 / 0.021 / 0.46 (the quant_model test model; ~1.2x the W4A16_AWQ errors of the same model)
    "NVFP4": Tolerances(3.0, 0.45, 0.06, 0.15, 0.6, 1.5),
}
# Extra allowance of a quantized KV cache: added to the errors, subtracted from the top-1 floor.
# alone: INT8 0.031 / 0.0036 / 1.0e-5 / 1.0 / layer 0.0093; FP8 0.080 / 0.0098 / 8.0e-5 / 1.0 / layer 0.026,
# and on the quant_model test model (the KV-only hf-modelopt export, 37 tokens) 0.10 / 0.016 / 2.1e-4 / 0.84:
# its flatter distributions flip top-1 where KL barely moves, hence the wide top-1 allowance
KV_ALLOWANCE: dict[str, Tolerances] = {
    "INT8": Tolerances(0.15, 0.015, 5e-4, 0.02, 0.03, 0.02),
    "FP8": Tolerances(0.3, 0.03, 1e-3, 0.25, 0.08, 0.05),
}


def weight_family(quant_algo: str | None) -> str:
    if quant_algo is None:
        return "none"
    if quant_algo.startswith("W8A8_SQ"):
        return "W8A8_SQ"
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
