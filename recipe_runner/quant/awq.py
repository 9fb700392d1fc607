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
_BLOCK_ELEMENTS = 1 << 22  # weight elements fake-quantized at a time (16 MiB float32; smaller blocks measured
# faster on an idle machine but ~3.6 x slower on an oversubscribed one: each op is an OpenMP region)


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


def _error_rows(tokens: int, width: int) -> int:
    """Weight rows per error GEMM. This chunking fixes the float64 summation order of the errors (one
    partial per chunk, added in row order), so it is part of the results: changing it moves their last bits."""
    return max(1, _CHUNK_ELEMENTS // max(tokens, width))


def _fake_quant_diff(out: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """out[:] = Q(W·diag(s))·diag(s)⁻¹ − W for float32 `weight` [rows, in]: the float32 operations of
    scaled_fake_quant, in the same order (the int8 codes' round trip is exact, so it is skipped), done in
    place on blocks of _BLOCK_ELEMENTS so that each block stays in the CPU caches through all of them."""
    block = max(1, _BLOCK_ELEMENTS // weight.shape[1])
    for b0 in range(0, weight.shape[0], block):
        w, o = weight[b0:b0 + block], out[b0:b0 + block]
        torch.mul(w, s, out=o)
        g = o.view(o.shape[0], -1, group_size)
        scale = (absmax(g, dim=2) / INT4_MAX).clamp_(min=MIN_SCALE).unsqueeze(2)
        g.div_(scale).round_().clamp_(INT4_MIN, INT4_MAX).mul_(scale)
        o.div_(s).sub_(w)
    return out


def _squared_error(x: torch.Tensor, diff: torch.Tensor) -> float:
    """||x diffᵀ||², the float32 GEMM's output squared and summed in float64."""
    return float((x @ diff.T).double().pow_(2).sum())


def scaled_output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, group_size: int) -> float:
    """Σ ||x (Q(W·diag(s))·diag(s)⁻¹ − W)ᵀ||² (float64 accumulation), computed in row chunks of the
    weight (_error_rows) so the float32 temporaries stay bounded whatever the layer size."""
    x = x.float()
    _groups(weight[:1], group_size)  # the divisibility check
    rows = _error_rows(x.shape[0], weight.shape[1])
    diff = torch.empty(min(rows, weight.shape[0]), weight.shape[1])
    total = 0.0
    for r0 in range(0, weight.shape[0], rows):
        chunk = weight[r0:r0 + rows].float()
        total += _squared_error(x, _fake_quant_diff(diff[:chunk.shape[0]], chunk, s, group_size))
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
    """Pick α ∈ {0, 1/grid, …, (grid-1)/grid} minimizing the group's output error on `x` [tokens, in].

    What does not depend on α is done once: x in float32, the candidate scales, and each weight chunk
    (read and converted once, then fake-quantized for every α into one reused buffer). The errors are
    bit for bit those of summing scaled_output_error over the weights for each α (the same chunks,
    GEMMs and float64 partials, added in the same order; tests/test_quant_awq.py keeps that reference)."""
    x = x.float()
    candidates = [candidate_scales(x_mean, i / grid) for i in range(grid)]
    partial = [[0.0] * len(weights) for _ in range(grid)]  # [α][weight], each summed over chunks in row order
    for k, weight in enumerate(weights):
        _groups(weight[:1], group_size)  # the divisibility check
        rows = _error_rows(x.shape[0], weight.shape[1])
        diff = torch.empty(min(rows, weight.shape[0]), weight.shape[1])
        for r0 in range(0, weight.shape[0], rows):
            chunk = weight[r0:r0 + rows].float().contiguous()
            d = diff[:chunk.shape[0]]
            for i, s in enumerate(candidates):
                partial[i][k] += _squared_error(x, _fake_quant_diff(d, chunk, s, group_size))
    errors = [sum(p) for p in partial]  # over the weights in order, as sum(generator) did
    best = min(range(grid), key=lambda i: (errors[i], i))  # ties: the smallest α
    return AwqSearch(best / grid, candidates[best], tuple(errors))
