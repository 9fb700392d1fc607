"""The SmoothQuant α search of `smoothquant_alpha: auto` (what it is: quant/sq_auto.py).

For one input group of one layer, with x [N, in] the kept input rows and W_p its projections'
float weights, the error at α is

    E(α) = Σ_p ||Q_a(x / s_α) · Q_w(W_p · diag(s_α))ᵀ − x · W_pᵀ||²

where s_α, Q_w and the static activation scale are the quantize stage's own (ProjectionQuantizer:
per-channel or per-tensor int8 weight scales, the static scale from the smoothed input's calibrated
max) and Q_a is the activation quantization TensorRT-LLM applies as the reference forward simulates
it (reference/numerics.py: one static per-tensor scale, or dynamic per token). The smoothing is
measured in float32 (Form FLOAT): a format's rounding of 1/s to the model dtype is below what α
moves. One α at a time (the grid is not batched: a batch of α would hold a quantized copy of the
weights per α), so memory stays the layer, the kept rows, the group's float outputs and a chunk of
one weight (the whole weight with per-tensor scales); within an α every kept row is in one GEMM.
Float64 sums, in a fixed order: the same inputs give the same errors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from recipe_runner.quant.chunks import row_slices
from recipe_runner.quant.projection import FLOAT, Form, GroupScaling, ProjectionQuantizer
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.quant.sq_auto import AlphaSearch
from recipe_runner.reference import numerics as nx

if TYPE_CHECKING:
    from recipe_runner.calibration.stats import CalibrationStats

SEARCH_FORM = Form(FLOAT)  # s in float32, every group smoothed (no norm folding: same product)


def search_quantizer(algo: str, alpha: float) -> ProjectionQuantizer:
    return ProjectionQuantizer(QuantSettings(algo, smoothquant_alpha=alpha), SEARCH_FORM, torch.float32)


def quantized_input(x: torch.Tensor, scaling: GroupScaling, dynamic: bool) -> torch.Tensor:
    """x smoothed (x / s) and int8 fake-quantized as the engine quantizes the GEMM's input."""
    smoothed = scaling.smoothing.input.vector(x) if scaling.smoothing is not None else x
    if dynamic:
        return nx.fake_int8_per_token(smoothed)
    return nx.fake_int8(smoothed, scaling.input_scale)


def squared_error(x_q: torch.Tensor, quantizer: ProjectionQuantizer, weight: torch.Tensor, scaling: GroupScaling,
                  reference: torch.Tensor) -> float:
    """||x_q · Q(W·diag(s))ᵀ − reference||², accumulated in float64 over row chunks of the weight: per-channel
    weight scales are row-local, so only a chunk is copied and quantized at a time; a per-tensor scale needs
    the whole weight, quantized as one chunk."""
    total = 0.0
    for rows in _chunks(quantizer, weight):
        dequantized = dequantized_weight(quantizer, weight[rows], scaling)
        total += float((x_q @ dequantized.T).sub_(reference[:, rows]).double().square().sum())
    return total


def dequantized_weight(quantizer: ProjectionQuantizer, weight: torch.Tensor, scaling: GroupScaling) -> torch.Tensor:
    """Q(W·diag(s)) in float32, for rows of a weight (all of them with a per-tensor scale); `weight` is not changed."""
    q = quantizer.quantize(weight.float().clone(), scaling)  # smooths its copy in place
    return q.codes.float().mul_(q.weight_scale.reshape(-1, 1))


def _chunks(quantizer: ProjectionQuantizer, weight: torch.Tensor) -> list[slice]:
    if quantizer.algorithm.granularity == "tensor":
        return [slice(0, weight.shape[0])]
    return list(row_slices(*weight.shape))


def group_errors(stats: CalibrationStats, layer: int, projections: Sequence[str],
                 weights: Mapping[str, torch.Tensor], x: torch.Tensor, search: AlphaSearch) -> tuple[float, ...]:
    """E(α) for each α of the grid, for the input group `projections` of `layer`; `stats` holds the
    layer's input and weight statistics (x_absmax), `x` [N, in] the kept input rows (float32)."""
    x = x.float()
    dynamic = QuantSettings(search.algo).algorithm.activations == "dynamic"
    reference = {p: x @ weights[p].float().T for p in projections}
    errors = []
    for alpha in search.grid:
        quantizer = search_quantizer(search.algo, alpha)
        scaling = quantizer.scale_group(stats, layer, projections, lambda p: weights[p].float())
        x_q = quantized_input(x, scaling, dynamic)
        errors.append(sum(squared_error(x_q, quantizer, weights[p], scaling, reference[p]) for p in projections))
    return tuple(errors)
