"""SmoothQuant (W8A8): migrate activation outliers into the weights, then quantize both to int8.

For a GEMM y = x Wᵀ with input-channel activation maxima a_j (from calibration) and weight column
maxima w_j = max over the rows of every matrix reading that input:

    s_j = clamp(a_j^α / w_j^(1-α), min=1e-5)        x' = x / s,   W' = W · diag(s)

so x' W'ᵀ = x Wᵀ exactly before rounding. q/k/v share one s (one input), so do gate/up.

Scale names follow TensorRT-LLM's generate_int8 (docs/format/trtllm-checkpoint.md §4.2), where
"orig→quant" factors multiply and "quant→orig" factors divide:
s_x = 127 / max|x'|, s_y = 127 / max|y|, s_w = 127 / max|W'|.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from recipe_runner.quant.chunks import map_row_chunks
from recipe_runner.quant.reductions import absmax

INT8_MAX = 127.0
MIN_SMOOTHER = 1e-5  # TensorRT-LLM's clamp: keeps s finite for dead channels
MIN_RANGE = torch.finfo(torch.float32).tiny


def smoothing_factors(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """float32 [in]: s_j = a_j^α / w_j^(1-α), w_j = max |W[:, j]| over all `weights`."""
    w = torch.stack([column_absmax(wt) for wt in weights]).amax(dim=0)
    w = w.clamp(min=MIN_SMOOTHER)
    a = act_absmax.float().clamp(min=MIN_SMOOTHER)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SMOOTHER)


def column_absmax(weight: torch.Tensor) -> torch.Tensor:
    """float32 max |W[:, j]| per input channel; lets callers combine several weights one at a time. Taken
    in the weight's own float dtype (abs and max are exact in any: no float32 copy) per row chunk, on
    every core (quant/chunks.py), by halving the chunk's rows with elementwise maxima, which stream
    through memory (a reduction down the columns does not); the chunks' maxima are then combined, and
    max is exact and order independent, so chunking and threads leave the bytes unchanged."""
    rows, cols = weight.shape
    if rows == 0:
        raise ValueError("column_absmax of a weight without rows")
    partial: dict[int, torch.Tensor] = {}

    def chunk(s: slice) -> None:
        part = weight[s].abs() if weight.is_floating_point() else weight[s].float().abs()
        while part.shape[0] > 1:
            half = part.shape[0] // 2
            top = torch.maximum(part[:half], part[half:2 * half])
            if part.shape[0] % 2:
                top[0] = torch.maximum(top[0], part[2 * half])
            part = top
        partial[s.start] = part[0]

    map_row_chunks(chunk, rows, cols, weight.device)
    return torch.stack([partial[start] for start in sorted(partial)]).amax(dim=0).float()


def factors_from_column_max(act_absmax: torch.Tensor, weight_colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """smoothing_factors() from a precomputed max over the weights' column maxima."""
    w = weight_colmax.float().clamp(min=MIN_SMOOTHER)
    a = act_absmax.float().clamp(min=MIN_SMOOTHER)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SMOOTHER)


def smooth_weight(weight: torch.Tensor, s: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """W · diag(s) in float32 (columns scaled); `inplace` reuses a float32 `weight` (saves a copy)."""
    if inplace and weight.dtype == torch.float32:
        return weight.mul_(s.float()[None, :])
    return weight.float() * s.float()[None, :]


def smooth_activation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x · diag(s)⁻¹ in float32."""
    return x.float() / s.float()


@dataclass(frozen=True)
class Int8Weight:
    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 dequantization scale: [out] per channel or [1] per tensor


def _to_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = weight / scale  # the only full-size temporary: rounding and clamping happen in place
    return q.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_int8_per_channel(weight: torch.Tensor) -> Int8Weight:
    """scale[o] = max|W[o, :]| / 127 (s_w_quant_orig.col)."""
    w = weight.float()
    scale = (absmax(w, dim=1) / INT8_MAX).clamp(min=MIN_RANGE)
    return Int8Weight(_to_int8(w, scale[:, None]), scale)


def quantize_int8_per_tensor(weight: torch.Tensor) -> Int8Weight:
    """scale = max|W| / 127 (s_w_quant_orig)."""
    w = weight.float()
    scale = (absmax(w) / INT8_MAX).clamp(min=MIN_RANGE).reshape(1)
    return Int8Weight(_to_int8(w, scale), scale)


@dataclass(frozen=True)
class StaticScales:
    """Per-tensor activation scales of a static (not per-token) SmoothQuant GEMM."""

    x_orig_quant: float  # s_x = 127 / max|x'|: the norm's scale_to_int / quantization_scaling_factor
    y_quant_orig: float  # max|y| / 127: act_scale

    def y_accum_quant(self, weight_scale: torch.Tensor) -> torch.Tensor:
        """s_y / (s_x · s_w) for dequantization weight scales `weight_scale` (= 1 / s_w)."""
        s_y = 1.0 / self.y_quant_orig
        return (s_y / self.x_orig_quant * weight_scale.double()).float()


def static_scales(x_absmax: float, y_absmax: float) -> StaticScales:
    return StaticScales(INT8_MAX / max(x_absmax, MIN_RANGE), max(y_absmax, MIN_RANGE) / INT8_MAX)


def activation_scale(x_absmax: float) -> torch.Tensor:
    """float32 [1] dequantization scale of int8 activations (ModelOpt's activation_scaling_factor)."""
    return torch.tensor([max(x_absmax, MIN_RANGE) / INT8_MAX], dtype=torch.float32)
