"""One projection's quantization, for every algorithm and every checkpoint format.

An input group (the projections reading one input: q/k/v, o, gate/up, down) first gets its shared
values, `GroupScaling` (the smoothing s, a weight amax shared by fused projections, the activation
scale), then each projection is quantized on its own into a `QuantizedProjection` (unpacked codes
and scales). The writers lay that out: stages/quantize.py as TensorRT-LLM rank-file tensors,
hfexport/export.py as the Hugging Face formats. What a format decides about the math itself is its
`Form`; everything else follows from the algorithm (quant/algorithms.py). Math in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from recipe_runner.models.llama import LLAMA
from recipe_runner.quant import fp8, nvfp4, smoothquant as sq
from recipe_runner.quant.algorithms import AWQ, FP8, NVFP4, WEIGHT_ONLY, Algorithm
from recipe_runner.quant.reductions import absmax
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.quant.sq_auto import is_auto
from recipe_runner.quant.weight_only import FORMATS, MIN_SCALE, int_codes

if TYPE_CHECKING:
    from recipe_runner.calibration.stats import CalibrationStats

# How the smoothing s (W' = W·diag(s), x' = x·diag(s)⁻¹) reaches a checkpoint:
# PREQUANT  p = 1/s rounded to the model dtype is stored for every linear and the engine multiplies x by
#           it, so W is multiplied by exactly 1/p (TensorRT-LLM's ModelOpt forms: AWQ, W8A8_SQ_PER_CHANNEL)
# FLOAT     s stays float32: folded into the preceding norm as norm/s, else stored as the `smoother` the
#           network divides x by (TensorRT-LLM's SmoothQuant plugin form,
#           docs/format/trtllm-checkpoint.md §4.2)
# FOLD      p = 1/s rounded, folded into the preceding norm as norm·p; W is divided by the ratio that
#           rounded norm really applies; without a norm p is stored (pre_quant_scale) and W divided by it
#           (the Hugging Face exports, ModelOpt's unified export)
PREQUANT, FLOAT, FOLD = "prequant", "float", "fold"


@dataclass(frozen=True)
class Form:
    """What a checkpoint format decides about the shared math."""

    smoothing: str  # PREQUANT, FLOAT or FOLD
    smooth_unfolded: bool = True  # also smooth groups no norm precedes (compressed-tensors does not)
    fused_weight_scale: bool = False  # FP8: one weight scale per input group (trtllm-build fuses qkv, fc+gate)
    weight_only_codes: bool = True  # False: the checkpoint keeps the float weight and only the scales
    model_dtype_int_scales: bool = False  # weight-only/AWQ scales rounded to the model dtype, codes from those


@dataclass(frozen=True)
class Scaling:
    """Multiplication (or division) by a float32 per-input-channel factor. Which of the two matters:
    they round differently, and each format reproduces its reference exporter bit for bit."""

    factor: torch.Tensor
    divide: bool = False

    def columns(self, weight: torch.Tensor) -> torch.Tensor:
        """Scale the columns of a float32 [out, in] weight, in place."""
        return weight.div_(self.factor[None, :]) if self.divide else weight.mul_(self.factor[None, :])

    def vector(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.factor if self.divide else x * self.factor


@dataclass(frozen=True)
class Smoothing:
    weight: Scaling  # applied to each weight of the group
    input: Scaling  # applied to the input's absmax: the range the smoothed activations have
    prequant: torch.Tensor | None = None  # model dtype [in]: the 1/s a consumer multiplies x by
    smoother: torch.Tensor | None = None  # float32 [in]: the s a consumer divides x by (FLOAT, no norm)
    norm: torch.Tensor | None = None  # model dtype: the preceding norm's weight with the smoothing folded in


@dataclass(frozen=True)
class GroupScaling:
    """Values shared by the projections of one input group."""

    smoothing: Smoothing | None = None
    weight_amax: float | None = None  # max |W| over the group, where its projections share a weight scale
    input_amax: float | None = None  # max |x| of the (smoothed) input
    input_scale: torch.Tensor | None = None  # 0-dim float32: the static activation dequantization scale
    weight_scale_2: torch.Tensor | None = None  # 0-dim float32: NVFP4's global weight scale ws2


@dataclass(frozen=True)
class QuantizedProjection:
    """One projection quantized, before a format lays it out. Scales dequantize (W ≈ codes·scale)."""

    codes: torch.Tensor | None  # [out, in] unpacked: int8 integers, float8_e4m3fn, or uint8 E2M1 codes
    weight_scale: torch.Tensor  # 0-dim (tensor), [out] (channel), [out, in/g] (group), e4m3 [out, in/16] (NVFP4)
    weight_scale_2: torch.Tensor | None = None  # NVFP4 ws2, 0-dim
    input_scale: torch.Tensor | None = None  # static activations, 0-dim
    prequant: torch.Tensor | None = None  # the group's stored 1/s (model dtype [in]), where no norm absorbs it


FIELDS = ("codes", "weight_scale", "weight_scale_2", "input_scale", "prequant")
Spec = tuple[torch.dtype, tuple[int, ...]]
NO_SCALING = GroupScaling()


@dataclass(frozen=True)
class ProjectionQuantizer:
    settings: QuantSettings
    form: Form
    dtype: torch.dtype  # the model dtype: weights are rounded to it before the math, prequant stored in it

    @property
    def algorithm(self) -> Algorithm:
        return self.settings.algorithm

    # ---- one input group -------------------------------------------------------------------------

    def scale_group(self, stats: CalibrationStats | None, layer: int, projections: Sequence[str],
                    read: Callable[[str], torch.Tensor],
                    norm: Callable[[], torch.Tensor] | None = None) -> GroupScaling:
        """The shared values of the quantized `projections` of one input group of `layer`. `read(p)` gives a
        weight (model dtype or float32: the same values); `norm()` the float32 weight of the norm that
        precedes the group, when one does."""
        algo = self.algorithm
        if not (algo.smooths or algo.activations):  # weight-only: nothing shared
            return NO_SCALING
        assert stats is not None, f"algo {algo.name} needs calibration statistics"
        smoothing = self._smoothing(stats, layer, projections, read, norm)
        weight_amax = None
        if algo.family == NVFP4 or (algo.family == FP8 and self.form.fused_weight_scale):
            weight_amax = max(float(absmax(read(p))) for p in projections)
        if algo.activations is None:
            return GroupScaling(smoothing, weight_amax)
        x = stats.linear(layer, projections[0]).x_absmax
        input_amax = float((smoothing.input.vector(x) if smoothing else x).max())
        return GroupScaling(smoothing, weight_amax, input_amax, self._input_scale(input_amax),
                            nvfp4.global_scale(weight_amax) if algo.family == NVFP4 else None)

    def _input_scale(self, amax: float) -> torch.Tensor | None:
        if self.algorithm.activations != "static":
            return None
        if self.algorithm.family == FP8:
            return fp8.fp8_scale(amax).reshape(())
        if self.algorithm.family == NVFP4:
            return nvfp4.global_scale(amax)
        return sq.activation_scale(amax).reshape(())

    def _factor(self, stats: CalibrationStats, layer: int, projections: Sequence[str],
                read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """s: AWQ's searched scales (named by the group's first projection in calibration), or SmoothQuant's
        s_j = a_j^α / w_j^(1-α) over every weight of the group, α the recipe's or (auto) the group's searched one."""
        first = LLAMA.group_of(projections[0]).first  # calibration names an input group by it
        if self.algorithm.family == AWQ:
            return stats.awq_scales(layer, first)  # searched per input group
        colmax = torch.stack([sq.column_absmax(read(p)) for p in projections]).amax(dim=0)
        x = stats.linear(layer, projections[0]).x_absmax
        alpha = self.settings.smoothquant_alpha
        return sq.factors_from_column_max(x, colmax, stats.smoothquant_alpha(layer, first) if is_auto(alpha) else alpha)

    def _smoothing(self, stats: CalibrationStats, layer: int, projections: Sequence[str],
                   read: Callable[[str], torch.Tensor], norm: Callable[[], torch.Tensor] | None) -> Smoothing | None:
        form = self.form
        if not self.algorithm.smooths or (norm is None and not form.smooth_unfolded):
            return None
        s = self._factor(stats, layer, projections, read)
        if form.smoothing == FLOAT:
            if norm is None:
                return Smoothing(Scaling(s), Scaling(s, divide=True), smoother=s)
            return Smoothing(Scaling(s), Scaling(s, divide=True), norm=(norm() / s).to(self.dtype))
        p = (1.0 / s).to(self.dtype)
        if form.smoothing == PREQUANT:
            return Smoothing(Scaling(1.0 / p.float()), Scaling(p.float()), prequant=p)
        if norm is None:
            return Smoothing(Scaling(p.float(), divide=True), Scaling(p.float()), prequant=p)
        ln = norm()
        folded = (ln * p.float()).to(self.dtype)
        exact = torch.where(ln != 0, folded.float() / ln, p.float())  # what the rounded norm really applies
        return Smoothing(Scaling(exact, divide=True), Scaling(exact), norm=folded)

    # ---- one projection --------------------------------------------------------------------------

    def takes_model_dtype(self, group: GroupScaling) -> bool:
        """Whether `quantize` may be given the weight in the model dtype, read-only (mapped from the source):
        FP8 and NVFP4 cast each row chunk to float32 themselves (in cache, on every core), so with nothing
        to smooth in place a float32 copy of the whole weight would be written and read for nothing. The
        bytes are the same: float32 holds every model-dtype value exactly."""
        return self.algorithm.family in (FP8, NVFP4) and group.smoothing is None

    def quantize(self, weight: torch.Tensor, group: GroupScaling) -> QuantizedProjection:
        """`weight`: float32 [out, in] holding model-dtype values, smoothed in place; or, where
        `takes_model_dtype(group)`, the model-dtype weight itself (not written to)."""
        family = self.algorithm.family
        if group.smoothing is not None:
            group.smoothing.weight.columns(weight)
        if family == FP8:
            amax = group.weight_amax if group.weight_amax is not None else float(absmax(weight))
            scale = fp8.fp8_scale(amax).reshape(())
            codes = fp8.quantize_fp8(weight, scale)
        elif family == NVFP4:
            scale = nvfp4.block_scales(weight, group.weight_scale_2)
            codes = nvfp4.quantize(weight, scale, group.weight_scale_2)
        else:  # integers: weight-only, AWQ, SmoothQuant
            fmt = FORMATS[self.algorithm.weight_bits]
            scale = self._int_scale(weight, fmt.qmax)
            keep = family != WEIGHT_ONLY or self.form.weight_only_codes
            codes = int_codes(weight, scale, fmt) if keep else None
        prequant = group.smoothing.prequant if group.smoothing is not None else None
        return QuantizedProjection(codes, scale, group.weight_scale_2, group.input_scale, prequant)

    def _int_scale(self, weight: torch.Tensor, qmax: int) -> torch.Tensor:
        """amax / qmax per tensor, output channel or group of inputs (AWQ: group amax / 7)."""
        granularity = self.algorithm.granularity
        if granularity == "tensor":
            amax = absmax(weight)
        elif granularity == "group":
            amax = absmax(weight.reshape(weight.shape[0], -1, self.settings.group_size), dim=2)
        else:
            amax = absmax(weight, dim=1)
        return self.scale_from_amax(amax.float(), qmax)

    def scale_from_amax(self, amax: torch.Tensor, qmax: int) -> torch.Tensor:
        """The integer formats' dequantization scale from the float32 max |W| of its granule."""
        scale = (amax / qmax).clamp(min=MIN_SCALE)
        if self.form.model_dtype_int_scales and self.algorithm.family in (WEIGHT_ONLY, AWQ):
            return scale.to(self.dtype)  # the stored scale is the one the codes come from
        return scale

    def weight_only_scale(self, rows: Iterable[torch.Tensor]) -> torch.Tensor:
        """W8A16/W4A16 per-channel scales where the checkpoint keeps the float weight (no codes), from its
        row chunks in the model dtype: max |W| is exact in any float dtype, so no float32 copy is made."""
        assert self.algorithm.family == WEIGHT_ONLY and not self.form.weight_only_codes
        assert self.algorithm.granularity not in ("tensor", "group")
        amax = torch.cat([absmax(chunk.to(self.dtype), dim=1).float() for chunk in rows])
        return self.scale_from_amax(amax, FORMATS[self.algorithm.weight_bits].qmax)

    # ---- shapes, without computing ---------------------------------------------------------------

    def specs(self, shape: tuple[int, int], follows_norm: bool) -> dict[str, Spec]:
        """field -> (dtype, shape) of what `quantize` returns for a weight of `shape` in a group that a
        norm precedes or not (FIELDS order; fields it leaves None are absent)."""
        algo, form = self.algorithm, self.form
        o, i = shape
        f32 = torch.float32
        out: dict[str, Spec] = {}
        if algo.family == FP8:
            out.update(codes=(torch.float8_e4m3fn, (o, i)), weight_scale=(f32, ()))
        elif algo.family == NVFP4:
            out.update(codes=(torch.uint8, (o, i)), weight_scale=(torch.float8_e4m3fn, (o, i // nvfp4.BLOCK)),
                       weight_scale_2=(f32, ()))
        else:
            if algo.family != WEIGHT_ONLY or form.weight_only_codes:
                out["codes"] = (torch.int8, (o, i))
            rounded = form.model_dtype_int_scales and algo.family in (WEIGHT_ONLY, AWQ)
            scale_shape = {"tensor": (), "group": (o, i // self.settings.group_size)}.get(algo.granularity, (o,))
            out["weight_scale"] = (self.dtype if rounded else f32, scale_shape)
        if algo.activations == "static":
            out["input_scale"] = (f32, ())
        if self._keeps_prequant(follows_norm):
            out["prequant"] = (self.dtype, (i,))
        return out

    def _keeps_prequant(self, follows_norm: bool) -> bool:
        form = self.form
        if not self.algorithm.smooths or form.smoothing == FLOAT:
            return False
        if form.smoothing == PREQUANT:
            return True
        return not follows_norm and form.smooth_unfolded
