"""`smoothquant_alpha: auto`: what the per-layer α search is, as data (no torch: the stage registry
builds the calibrate key from it on the warm path).

With `auto`, the calibrate stage keeps evenly spaced input rows of every input group (the mechanism
AWQ's search uses, calibration/stats.py), and for each decoder layer and input group (q/k/v, o,
gate/up, down) tries every α of GRID: the group's projections quantized W8A8 exactly as the recipe's
algo quantizes them (per-channel or per-tensor int8 weights, static per-tensor or dynamic per-token
int8 activations), their output compared with the float output on the kept rows. The α with the
smallest summed squared error is that group's choice (ties: the smaller α); the math is
quant/sq_search.py's.

A layer's output error is not the model's loss: on SmolLM2-135M the per-layer choice alone made
per-tensor SmoothQuant worse than the default α 0.5 (held-out perplexity ×1.37–1.41 against
×1.34–1.38), while it was the best of all for per-channel weights. So a second step chooses what is
kept by the model's own objective (calibration/alpha_select.py): candidates are the per-layer choice
and every α of GRID used for the whole model; each is run through the quantized model (every decoder
layer fake-quantized as the checkpoint will be, in lockstep with calibration: each layer's weights
are read once) on the first SELECT_TOKENS calibration tokens, and the one with the smallest mean
next-token loss (negative log-likelihood of the calibration text) is kept (ties: the earlier
candidate, the per-layer choice first). The search can therefore not do worse, on its calibration
tokens, than any α of the grid applied uniformly. Quantize and the HF exports read the α kept from
the calibrate artifact; smoothquant.json reports both steps.

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
from typing import Any, Mapping, Union

AUTO = "auto"
REPORT_FILE = "smoothquant.json"  # the searched α, beside config.json and in each HF export (auto only)
REPORT_FORMAT = "recipe-runner/smoothquant-alpha/1"
GRID: tuple[float, ...] = tuple(i / 20 for i in range(21))  # i / 20: each the double nearest k·0.05
SEARCH_TOKENS = 1024  # input rows kept per input group and layer: the search's samples
SELECT_TOKENS = 2048  # calibration tokens the candidates' next-token loss is measured on
PER_LAYER = "per-layer"  # the candidate that keeps each group's own choice
DEFAULT_ALPHA = 0.5  # the schema's default: the errors are also reported against it


def is_auto(alpha: Any) -> bool:
    return alpha == AUTO


@dataclass(frozen=True)
class AlphaSearch:
    """The search settings; the calibrate key holds them (`params`), so any change recalibrates."""

    algo: str  # the w8a8_sq_* algo whose quantization the error measures
    grid: tuple[float, ...] = GRID
    tokens: int = SEARCH_TOKENS
    select_tokens: int = SELECT_TOKENS

    def params(self) -> dict[str, Any]:
        return {"algo": self.algo, "grid": list(self.grid), "tokens": self.tokens, "select_tokens": self.select_tokens}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AlphaSearch:
        return cls(params["algo"], tuple(float(a) for a in params["grid"]), int(params["tokens"]),
                   int(params["select_tokens"]))

    def candidates(self) -> tuple[Candidate, ...]:
        """The second step's candidates, in tie-breaking order."""
        return (PER_LAYER, *self.grid)


Candidate = Union[str, float]  # PER_LAYER, or one α for every layer and group


@dataclass(frozen=True)
class AlphaSelection:
    """The second step's outcome: each candidate's mean next-token loss over `tokens` calibration tokens."""

    tokens: int
    losses: tuple[tuple[Candidate, float], ...]  # in the search's candidate order

    @property
    def chosen(self) -> Candidate:
        best = min(range(len(self.losses)), key=lambda i: (self.losses[i][1], i))
        return self.losses[best][0]

    def kept(self, group_choice: float) -> float:
        """The α a group keeps: its own choice, or the chosen uniform α."""
        chosen = self.chosen
        return group_choice if chosen == PER_LAYER else float(chosen)

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "chosen": self.chosen,
                "candidates": [{"alpha": c, "loss": loss} for c, loss in self.losses]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AlphaSelection:
        return cls(int(data["tokens"]), tuple((c["alpha"], float(c["loss"])) for c in data["candidates"]))


@dataclass(frozen=True)
class AlphaChoice:
    """One layer's input group: its own choice of α (the first step), and the output error at every grid α."""

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


def kept_alphas(alphas: Mapping[tuple[int, str], AlphaChoice], selection: AlphaSelection) -> dict[tuple[int, str], float]:
    """The α each layer and group keeps after both steps."""
    return {key: selection.kept(c.alpha) for key, c in sorted(alphas.items())}


def mean_alpha(alphas: Mapping[tuple[int, str], AlphaChoice], selection: AlphaSelection) -> float:
    """The mean α kept over every layer and input group (config.json's one smoothquant_val)."""
    kept = kept_alphas(alphas, selection)
    return round(sum(kept.values()) / len(kept), 6)


def alpha_report(search: AlphaSearch, alphas: Mapping[tuple[int, str], AlphaChoice],
                 selection: AlphaSelection) -> dict[str, Any]:
    """What smoothquant.json says: per layer and input group (named by its first projection), the α kept, the
    group's own choice, the error at both and at the default α, the error at every grid α; each candidate's
    next-token loss and the one chosen; the search's settings."""
    layers: dict[int, dict[str, Any]] = {}
    for (layer, group), c in sorted(alphas.items()):
        kept = selection.kept(c.alpha)
        layers.setdefault(layer, {})[group] = {
            "alpha": kept, "error": c.error_at(search.grid, kept), "group_alpha": c.alpha,
            "group_error": c.error(search.grid),
            "error_at_default_alpha": c.error_at(search.grid, DEFAULT_ALPHA), "errors": list(c.errors)}
    return {"format": REPORT_FORMAT, "search": search.params(), "default_alpha": DEFAULT_ALPHA,
            "error": "sum over the kept input rows of the squared difference between the group's W8A8 output "
                     "and its float output",
            "loss": "mean negative log-likelihood of the next calibration token, the whole model quantized with "
                    "the candidate's alphas",
            "selection": selection.to_json(), "smoothquant_val": mean_alpha(alphas, selection),
            "layers": [{"layer": i, "groups": groups} for i, groups in sorted(layers.items())]}


@dataclass(frozen=True)
class AlphaSearchResult:
    """A search's outcome over a whole model: `alphas[(layer, first projection of the group)]`."""

    search: AlphaSearch
    alphas: Mapping[tuple[int, str], AlphaChoice]  # each group's own choice (the first step)
    selection: AlphaSelection  # the second step

    def kept(self) -> dict[tuple[int, str], float]:
        return kept_alphas(self.alphas, self.selection)

    def report(self) -> dict[str, Any]:
        return alpha_report(self.search, self.alphas, self.selection)
