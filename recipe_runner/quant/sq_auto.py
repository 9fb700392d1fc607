"""`smoothquant_alpha: auto`: what the per-layer α search is, as data (no torch: the stage registry
builds the calibrate key from it on the warm path).

With `auto`, the calibrate stage keeps evenly spaced input rows of every input group (the mechanism
AWQ's search uses, calibration/stats.py), and for each decoder layer and input group (q/k/v, o,
gate/up, down) tries every α of GRID: the group's projections quantized W8A8 exactly as the recipe's
algo quantizes them (per-channel or per-tensor int8 weights, static per-tensor or dynamic per-token
int8 activations), their output compared with the float output on the kept rows. The α with the
smallest summed squared error is kept (ties: the smaller α); quantize and the HF exports read it
from the calibrate artifact. The math is quant/sq_search.py's.

The grid: α from 0 to 1 in steps of 0.05 (21 points). The range and the idea of a layer-wise search
over a uniform grid are Intel Neural Compressor's SmoothQuant auto-tuning (as documented for
intel-extension-for-pytorch's `autotune`: alpha_min 0.0, alpha_max 1.0, alpha_step 0.1,
https://intel.github.io/intel-extension-for-pytorch/cpu/2.5.0+cpu/tutorials/features/sq_recipe_tuning_api.html);
the step is halved so that the per-model α SmoothQuant's authors publish for LLaMA-family models (0.8,
0.85, 0.9 in mit-han-lab's lmquant scripts) are grid points, and it contains today's default 0.5, so
the search never does worse than the default on its samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

AUTO = "auto"
REPORT_FILE = "smoothquant.json"  # the searched α, beside config.json and in each HF export (auto only)
REPORT_FORMAT = "recipe-runner/smoothquant-alpha/1"
GRID: tuple[float, ...] = tuple(i / 20 for i in range(21))  # i / 20: each the double nearest k·0.05
SEARCH_TOKENS = 1024  # input rows kept per input group and layer: the search's samples
DEFAULT_ALPHA = 0.5  # the schema's default: the errors are also reported against it


def is_auto(alpha: Any) -> bool:
    return alpha == AUTO


@dataclass(frozen=True)
class AlphaSearch:
    """The search settings; the calibrate key holds them (`params`), so any change recalibrates."""

    algo: str  # the w8a8_sq_* algo whose quantization the error measures
    grid: tuple[float, ...] = GRID
    tokens: int = SEARCH_TOKENS

    def params(self) -> dict[str, Any]:
        return {"algo": self.algo, "grid": list(self.grid), "tokens": self.tokens}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AlphaSearch:
        return cls(params["algo"], tuple(float(a) for a in params["grid"]), int(params["tokens"]))


@dataclass(frozen=True)
class AlphaChoice:
    """One layer's input group: the α kept, and the output error at every grid α."""

    alpha: float
    errors: tuple[float, ...]  # in grid order

    @classmethod
    def pick(cls, grid: tuple[float, ...], errors: tuple[float, ...]) -> AlphaChoice:
        """The α of the smallest error; ties go to the smaller α (less migrated into the weights)."""
        best = min(range(len(grid)), key=lambda i: (errors[i], grid[i]))
        return cls(grid[best], tuple(errors))

    def error_at(self, grid: tuple[float, ...], alpha: float) -> float:
        return self.errors[grid.index(alpha)]

    def error(self, grid: tuple[float, ...]) -> float:
        return self.error_at(grid, self.alpha)


def mean_alpha(alphas: Mapping[tuple[int, str], AlphaChoice]) -> float:
    """The mean searched α over every layer and input group (config.json's one smoothquant_val)."""
    return round(sum(c.alpha for _, c in sorted(alphas.items())) / len(alphas), 6)


def alpha_report(search: AlphaSearch, alphas: Mapping[tuple[int, str], AlphaChoice]) -> dict[str, Any]:
    """What smoothquant.json says: per layer and input group (named by its first projection), the α kept,
    its error and the error at the default α; the error at every grid α; the search's settings."""
    layers: dict[int, dict[str, Any]] = {}
    for (layer, group), c in sorted(alphas.items()):
        layers.setdefault(layer, {})[group] = {
            "alpha": c.alpha, "error": c.error(search.grid),
            "error_at_default_alpha": c.error_at(search.grid, DEFAULT_ALPHA), "errors": list(c.errors)}
    return {"format": REPORT_FORMAT, "search": search.params(), "default_alpha": DEFAULT_ALPHA,
            "error": "sum over the kept input rows of the squared difference between the group's W8A8 output "
                     "and its float output", "smoothquant_val": mean_alpha(alphas),
            "layers": [{"layer": i, "groups": groups} for i, groups in sorted(layers.items())]}


@dataclass(frozen=True)
class AlphaSearchResult:
    """A search's outcome over a whole model: `alphas[(layer, first projection of the group)]`."""

    search: AlphaSearch
    alphas: Mapping[tuple[int, str], AlphaChoice]

    def report(self) -> dict[str, Any]:
        return alpha_report(self.search, self.alphas)
