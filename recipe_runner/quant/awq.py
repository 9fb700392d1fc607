"""INT4 AWQ: group-wise int4 weights with an activation-aware per-input-channel scale.

Group quantization (per row, groups of `group_size` input channels): scale = group amax / 7,
codes = clamp(round(W / scale), -8, 7) (docs/format/verified-layouts.md).

Scale search (AWQ paper, Lin et al. 2023): for a group of linears reading the same input x,
with x̄_j = mean_t |x_tj|, try s = x̄^α for α on a grid in [0, 1) (normalized so that
sqrt(max(s)·min(s)) = 1), quantize W·diag(s), fold diag(s)⁻¹ back into the activations and keep
the α that minimizes the summed squared output error Σ ||x Ŵᵀ − x Wᵀ||² over the group. α = 0 is
plain group-wise rounding, so the chosen scales never do worse on the search tokens.
The checkpoint stores prequant_scaling_factor = 1/s (the engine multiplies x by it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from recipe_runner.quant.reductions import absmax

INT4_MIN, INT4_MAX = -8, 7
DEFAULT_GRID = 20
MIN_SCALE = torch.finfo(torch.float32).tiny
_CHUNK_ELEMENTS = 1 << 24  # output rows per error evaluation: bounded float32 temporaries


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = weight.shape
    if inp % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {inp}")
    return weight.float().reshape(out, inp // group_size, group_size)


def group_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in/group]: group amax / 7."""
    return (absmax(_groups(weight, group_size), dim=2) / INT4_MAX).clamp(min=MIN_SCALE)


def quantize_groupwise(weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 codes [out, in] in [-8, 7]."""
    g = _groups(weight, group_size)
    q = g / scales[:, :, None]
    return q.round_().clamp_(INT4_MIN, INT4_MAX).reshape(weight.shape).to(torch.int8)


def dequantize_groupwise(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    g = _groups(codes, group_size)
    return (g * scales[:, :, None]).reshape(codes.shape)


def fake_quantize_groupwise(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    scales = group_scales(weight, group_size)
    return dequantize_groupwise(quantize_groupwise(weight, scales, group_size), scales, group_size)


def candidate_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x̄^α, clamped and normalized as in the AWQ reference implementation."""
    s = x_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(weight: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """The effective weight Q(W·diag(s))·diag(s)⁻¹ the engine multiplies x by."""
    return fake_quantize_groupwise(weight.float() * s[None, :], group_size) / s[None, :]


def scaled_output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, group_size: int) -> float:
    """Σ ||x (Q(W·diag(s))·diag(s)⁻¹ − W)ᵀ||² (float64 accumulation), computed in row chunks of the
    weight so the float32 temporaries stay bounded whatever the layer size."""
    x = x.float()
    rows = max(1, _CHUNK_ELEMENTS // max(x.shape[0], weight.shape[1]))
    total = 0.0
    for r0 in range(0, weight.shape[0], rows):
        chunk = weight[r0:r0 + rows].float()
        diff = scaled_fake_quant(chunk, s, group_size) - chunk
        total += float((x @ diff.T).double().pow(2).sum())
    return total


@dataclass(frozen=True)
class AwqSearch:
    alpha: float
    scales: torch.Tensor  # float32 [in], the s applied to the weight columns
    errors: tuple[float, ...] = field(default=())  # output error for each grid alpha

    @property
    def plain_error(self) -> float:
        """The error of plain group-wise rounding (α = 0)."""
        return self.errors[0]

    @property
    def best_error(self) -> float:
        return min(self.errors)


def search_scales(x: torch.Tensor, weights: Sequence[torch.Tensor], x_mean: torch.Tensor, group_size: int,
                  grid: int = DEFAULT_GRID) -> AwqSearch:
    """Pick α ∈ {0, 1/grid, …, (grid-1)/grid} minimizing the group's output error on `x` [tokens, in]."""
    errors = []
    for i in range(grid):
        s = candidate_scales(x_mean, i / grid)
        errors.append(sum(scaled_output_error(x, w, s, group_size) for w in weights))
    best = min(range(grid), key=lambda i: (errors[i], i))  # ties: the smallest α
    return AwqSearch(best / grid, candidate_scales(x_mean, best / grid), tuple(errors))
