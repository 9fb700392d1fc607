"""Quantize stage: quantized weights and scales, one weight (or one layer's input group) at a time.

The math is quant/projection.py's (shared with the Hugging Face exports); this module lays its
results out as the tensors and per-rank rules of the TensorRT-LLM checkpoint.

Reads the source weights lazily (cast to the checkpoint dtype first, as TensorRT-LLM's converter
does, then float32 for the math), uses the calibrate stage's statistics, and writes the artifact
described in `stages/quantized.py`: one safetensors file per projection plus one per layer for
the module-level scales, each written with the streaming writer as soon as it is complete. Peak
memory: one projection in float32 (plus its quantized copy), never a whole layer or model.

Which tensors each algorithm writes (the README's Quantization table; names in trtllm/quant.py):
  w8a16/w4a16     nothing in the checkpoint (weights stay in the model dtype; trtllm-build
                  quantizes); per-channel scales kept here for verify
  fp8             float8_e4m3fn weights, weights_scaling_factor [1] (one over q/k/v, one shared
                  by fc/gate), activation_scaling_factor [1] = amax/448
  w8a8_sq_per_channel (ModelOpt form)  int8 W·diag(s) per-channel, weights_scaling_factor [out],
                  activation_scaling_factor [1], prequant_scaling_factor 1/s [in]; norms unchanged
  w8a8_sq_*_plugin  int8 weights, per_channel_scale, act_scale, smoother, norm scale_to_int,
                  module quantization_scaling_factor; s folded into the norms
                  (docs/format/trtllm-checkpoint.md §4.2)
  w4a16_awq       packed int4 [out/2, in], group weights_scaling_factor [out, in/g],
                  prequant_scaling_factor 1/s [in]
  kv int8/fp8     attention.kv_cache_scaling_factor [1] per layer
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from recipe_runner.calibration.stats import CalibrationStats, read_stats
from recipe_runner.errors import UserError
from recipe_runner.hf.config import ModelConfig, read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.models import layout_for
from recipe_runner.models.layout import Linear, ModelLayout
from recipe_runner.quant import kv, smoothquant as sq
from recipe_runner.quant.chunks import cast_rows, row_slices
from recipe_runner.quant.algorithms import AWQ, FP8, KV_CACHES, NONE, SMOOTHQUANT, WEIGHT_ONLY
from recipe_runner.quant.packing import pack_int4_rows
from recipe_runner.quant.projection import (FLOAT, PREQUANT, Form, GroupScaling, ProjectionQuantizer,
                                            QuantizedProjection)
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.quant.sq_auto import is_auto
from recipe_runner.stages.convert import read_model_facts
from recipe_runner.stages.manifest import SourceTensor
from recipe_runner.stages.registry import StageJob
from recipe_runner.stages.quantized import ARTIFACT_FILE, QuantizedArtifact, TensorRule
from recipe_runner.trtllm import quant as tq
from recipe_runner.io.safetensors_writer import write_safetensors

INDEX_FILE = "model.safetensors.index.json"  # makes the artifact readable by SourceCheckpoint


# ---- writing the artifact --------------------------------------------------------------------------

class ArtifactWriter:
    """Collects tensors per file; `flush(file)` writes that file's tensors and forgets them."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.weight_map: dict[str, str] = {}
        self.tensors: dict[str, SourceTensor] = {}

    def add(self, name: str, tensor: torch.Tensor, file_name: str) -> str:
        if name in self.tensors or any(name in p for p in self.pending.values()):
            raise ValueError(f"tensor {name} written twice")
        self.pending.setdefault(file_name, {})[name] = tensor.contiguous()
        return name

    def flush(self, file_name: str) -> None:
        tensors = self.pending.pop(file_name, {})
        if not tensors:
            return
        write_safetensors(self.out_dir / file_name, tensors)
        for name, t in tensors.items():
            self.weight_map[name] = file_name
            self.tensors[name] = SourceTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape))

    def write_index(self) -> None:
        if self.pending:
            raise ValueError(f"files never written: {sorted(self.pending)}")
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")


@dataclass
class LayerJob:
    """Everything one layer's quantization needs, and what it produces."""

    index: int
    cfg: ModelConfig
    reader: SourceCheckpoint
    dtype: torch.dtype
    settings: QuantSettings
    stats: CalibrationStats | None
    writer: ArtifactWriter
    rules: list[TensorRule] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    @property
    def quantizer(self) -> ProjectionQuantizer:
        form = TRTLLM_SQ_PLUGIN if self.settings.algorithm.sq_plugin else TRTLLM
        return ProjectionQuantizer(self.settings, form, self.dtype)

    @property
    def layout(self) -> ModelLayout:
        return layout_for(self.cfg)

    def weight(self, projection: str) -> torch.Tensor:
        """The projection's weight as the checkpoint stores it (model dtype), in float32 (quant/chunks.py
        cast_rows: row chunks on every core, no whole-weight copy)."""
        return cast_rows(self.reader, self.layout.hf_layer_tensor(self.index, projection + ".weight"), self.dtype)

    def model_weight(self, projection: str) -> torch.Tensor:
        """The projection's weight in the model dtype, read-only: mapped from the source when it is stored in
        that dtype (no copy), for the group statistics (max |W| is the same in float32)."""
        name = self.layout.hf_layer_tensor(self.index, projection + ".weight")
        return self.reader.rows(name, 0, self.reader.shape(name)[0]).to(self.dtype)

    def weight_only_scale(self, projection: str) -> torch.Tensor:
        """The projection's W8A16/W4A16 scales, from its rows as mapped (trtllm-build quantizes the weight)."""
        name = self.layout.hf_layer_tensor(self.index, projection + ".weight")
        rows, cols = self.reader.shape(name)
        chunks = (self.reader.rows(name, c.start, c.stop) for c in row_slices(rows, cols))
        scale = self.quantizer.weight_only_scale(chunks)
        self.reader.release()
        return scale

    def name(self, module: str, suffix: str) -> str:
        return self.layout.hf_layer_tensor(self.index, f"{module}.{suffix}")

    def file(self, what: str) -> str:
        return f"layer{self.index:05d}.{what}.safetensors"

    def add(self, module: str, suffix: str, tensor: torch.Tensor, file: str = "scales") -> str:
        """Queue `tensor` as `model.layers.{i}.{module}.{suffix}` in this layer's `file` (a
        projection's own file for its weight, "scales" for the small per-module tensors)."""
        return self.writer.add(self.name(module, suffix), tensor, self.file(file))

    def flush(self, what: str) -> None:
        self.writer.flush(self.file(what))

    def is_excluded(self, linear: Linear) -> bool:
        return tq.is_excluded(self.layout.trtllm_layer_tensor(self.index, linear.name), self.settings.exclude_modules)

    def linears(self) -> list[Linear]:
        """This layer's linears to quantize; the excluded ones are recorded and skipped."""
        keep = []
        for lin in self.layout.linears:
            if self.is_excluded(lin):
                self.excluded.append(self.layout.trtllm_layer_tensor(self.index, lin.name))
            else:
                keep.append(lin)
        return keep

    def scaling(self, projections: list[str], norm: str | None = None) -> GroupScaling:
        """The shared values of an input group's (quantized) projections; `norm`: the HF norm before it,
        when the form folds the smoothing into it."""
        read_norm = None
        if norm is not None:
            read_norm = lambda: self.reader.read(self.layout.hf_layer_tensor(self.index, norm)).to(self.dtype).float()  # noqa: E731
        return self.quantizer.scale_group(self.stats, self.index, projections, self.model_weight, read_norm)

    def quantize(self, projection: str, scaling: GroupScaling) -> QuantizedProjection:
        read = self.model_weight if self.quantizer.takes_model_dtype(scaling) else self.weight
        return self.quantizer.quantize(read(projection), scaling)

    def y_amax(self, projection: str) -> float:
        assert self.stats is not None
        return float(self.stats.linear(self.index, projection).y_absmax.max())

    def rule(self, suffix: str, split: str, sources: Sequence[tuple[str, str]], **kw) -> None:
        self.rules.append(TensorRule(suffix, split, tuple(sources), **kw))


def _weight_split(lin: Linear) -> str:
    return "out" if lin.parallel == "column" else "in"


def _input_groups(linears: list[Linear]) -> list[list[Linear]]:
    """Linears reading the same input (the layout's input groups): qkv | dense | fc + gate | proj."""
    groups: dict[str, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(lin.group.first, []).append(lin)
    return list(groups.values())


def _projections(group: list[Linear]) -> list[str]:
    return [p for lin in group for p in lin.projections]


# ---- algorithms, one layer at a time: the quantizer's results laid out as rank-file tensors ---------

def _weight_only(job: LayerJob) -> None:
    for lin in job.linears():
        for proj in lin.projections:
            job.add(proj, "weight_only_scale", job.weight_only_scale(proj))
    job.flush("scales")


def _fp8(job: LayerJob) -> None:
    for group in _input_groups(job.linears()):
        # one weight scale per fused qkv, and one shared by fc and gate (the form's fused_weight_scale)
        scaling = job.scaling(_projections(group))
        for lin in group:
            for proj in lin.projections:
                q = job.quantize(proj, scaling)
                job.add(proj, "qweight", q.codes, file=proj)
                job.flush(proj)
            job.rule(f"{lin.name}.{tq.WEIGHT}", _weight_split(lin),
                     [(p, job.name(p, "qweight")) for p in lin.projections])
            for suffix, value in ((tq.WEIGHTS_SCALING_FACTOR, q.weight_scale), (tq.ACTIVATION_SCALING_FACTOR,
                                                                                 scaling.input_scale)):
                job.rule(f"{lin.name}.{suffix}", "none", [("", job.add(lin.name, suffix, value.reshape(1)))])
    job.flush("scales")


def _sq_modelopt(job: LayerJob) -> None:
    """W8A8_SQ_PER_CHANNEL: W ≈ codes·scale[out]·prequant[in]; the engine multiplies x by prequant."""
    for group in _input_groups(job.linears()):
        scaling = job.scaling(_projections(group))
        for lin in group:
            row = lin.parallel == "row"
            for proj in lin.projections:
                q = job.quantize(proj, scaling)
                job.add(proj, "qweight", q.codes, file=proj)
                job.add(proj, tq.WEIGHTS_SCALING_FACTOR, q.weight_scale, file=proj)
                job.flush(proj)
            job.rule(f"{lin.name}.{tq.WEIGHT}", _weight_split(lin), [(p, job.name(p, "qweight")) for p in lin.projections])
            scale_sources = [(p, job.name(p, tq.WEIGHTS_SCALING_FACTOR)) for p in lin.projections]
            job.rule(f"{lin.name}.{tq.WEIGHTS_SCALING_FACTOR}", "none" if row else "out", scale_sources)
            job.rule(f"{lin.name}.{tq.ACTIVATION_SCALING_FACTOR}", "none",
                     [("", job.add(lin.name, tq.ACTIVATION_SCALING_FACTOR, scaling.input_scale.reshape(1)))])
            pq_name = job.add(lin.name, tq.PREQUANT_SCALING_FACTOR, scaling.smoothing.prequant)
            job.rule(f"{lin.name}.{tq.PREQUANT_SCALING_FACTOR}", "in" if row else "none", [(lin.projections[0], pq_name)])
    job.flush("scales")


def _sq_plugin(job: LayerJob) -> None:
    """TensorRT-LLM's SmoothQuant plugin form (docs/format/trtllm-checkpoint.md §4.2): smoothers
    folded into the norms (qkv, fc/gate) or kept as `smoother` tensors (dense, proj); static or
    per-token activations."""
    per_token = job.settings.algorithm.activations == "dynamic"
    module_scale = {"attention.dense": tq.ATTENTION_QUANTIZATION_SCALING_FACTOR,
                    "mlp.proj": tq.MLP_QUANTIZATION_SCALING_FACTOR}
    linears = job.linears()
    if len(linears) != len(job.layout.linears):  # plan.py refuses such recipes; this guards direct API use
        raise UserError(f"the SmoothQuant plugin form ({job.settings.algo}) quantizes every decoder layer; "
                        f"exclude_modules cannot exclude {job.excluded[0]}")
    for group in _input_groups(linears):
        norm = group[0].group.norm  # qkv and fc/gate: s folded into the preceding RMSNorm, norm / s
        hf_norm, tl_norm = (norm.hf_weight, norm.trtllm) if norm is not None else (None, None)
        scaling = job.scaling(_projections(group), hf_norm)
        x_max = scaling.input_amax  # the smoothed input's range
        if tl_norm is not None:
            smoothed = job.add(tl_norm, "smoothed", scaling.smoothing.norm)
            job.rule(f"{tl_norm}.weight", "none", [("", smoothed)])
            scale_to_int = 1.0 if per_token else sq.static_scales(x_max, 1.0).x_orig_quant
            job.rule(f"{tl_norm}.{tq.SCALE_TO_INT}", "none",
                     [("", job.add(tl_norm, tq.SCALE_TO_INT, torch.tensor([scale_to_int])))])
        else:  # dense / proj: the network divides their input by `smoother` at run time
            lin = group[0]
            smoother = job.add(lin.name, tq.SMOOTHER, scaling.smoothing.smoother)
            job.rule(f"{lin.name}.{tq.SMOOTHER}", "in", [(lin.projections[0], smoother)], lead_one=True)
            if not per_token:
                scale = torch.tensor([sq.static_scales(x_max, 1.0).x_orig_quant], dtype=torch.float32)
                job.rule(module_scale[lin.name], "none",
                         [("", job.add(lin.name, "quantization_scaling_factor", scale))])
        for lin in group:
            _sq_plugin_linear(job, lin, scaling, per_token)
    job.flush("scales")


def _sq_plugin_linear(job: LayerJob, lin: Linear, scaling: GroupScaling, per_token: bool) -> None:
    row = lin.parallel == "row"
    # y of the fused qkv is the concatenation of q, k and v: one static output range
    static = sq.static_scales(scaling.input_amax, max(job.y_amax(p) for p in lin.projections))
    scale_sources = []
    for proj in lin.projections:
        q = job.quantize(proj, scaling)
        if per_token:  # per-channel weights; dequantization happens per token × per channel
            scale = q.weight_scale
        else:  # per-tensor weights (one per q/k/v part); y = acc · s_y/(s_x·s_w) requantized
            scale = static.y_accum_quant(q.weight_scale.reshape(1))
            if lin.name == "attention.qkv":  # SmoothQuantAttention forces per-channel layout for qkv
                scale = scale.expand(q.codes.shape[0]).clone()
        job.add(proj, "qweight", q.codes, file=proj)
        job.add(proj, tq.PER_CHANNEL_SCALE, scale, file=proj)
        scale_sources.append((proj, job.name(proj, tq.PER_CHANNEL_SCALE)))
        job.flush(proj)
    job.rule(f"{lin.name}.{tq.WEIGHT}", _weight_split(lin), [(p, job.name(p, "qweight")) for p in lin.projections])
    per_row = per_token or lin.name == "attention.qkv"
    job.rule(f"{lin.name}.{tq.PER_CHANNEL_SCALE}", "out" if per_row and not row else "none", scale_sources,
             lead_one=True)
    if not per_token:
        act = job.add(lin.name, tq.ACT_SCALE, torch.tensor([static.y_quant_orig]))
        job.rule(f"{lin.name}.{tq.ACT_SCALE}", "none", [("", act)], lead_one=True)


def _awq(job: LayerJob) -> None:
    g = job.settings.group_size
    for group in _input_groups(job.linears()):
        scaling = job.scaling(_projections(group))
        for lin in group:
            row = lin.parallel == "row"
            for proj in lin.projections:
                q = job.quantize(proj, scaling)
                job.add(proj, "qweight", pack_int4_rows(q.codes), file=proj)
                job.add(proj, tq.WEIGHTS_SCALING_FACTOR, q.weight_scale, file=proj)
                job.flush(proj)
            job.rule(f"{lin.name}.{tq.WEIGHT}", _weight_split(lin), [(p, job.name(p, "qweight")) for p in lin.projections],
                     pack=1 if row else 2)
            job.rule(f"{lin.name}.{tq.WEIGHTS_SCALING_FACTOR}", _weight_split(lin),
                     [(p, job.name(p, tq.WEIGHTS_SCALING_FACTOR)) for p in lin.projections], in_group=g if row else 1)
            pq_name = job.add(lin.name, tq.PREQUANT_SCALING_FACTOR, scaling.smoothing.prequant)
            job.rule(f"{lin.name}.{tq.PREQUANT_SCALING_FACTOR}", "in" if row else "none", [(lin.projections[0], pq_name)])
    job.flush("scales")


def _kv_cache(job: LayerJob) -> None:
    layout = job.layout
    scale = kv.kv_cache_scale(job.settings.kv_cache, job.y_amax(layout.query), job.y_amax(layout.key),
                              job.y_amax(layout.value))
    name = job.add("attention", "kv_cache_scaling_factor", scale, file="kv")
    job.rule(tq.KV_CACHE_SCALING_FACTOR, "none", [("", name)])
    job.flush("kv")


# the rank-file layout of each family (nvfp4 has no TensorRT-LLM checkpoint form: targets.py refuses it)
WRITERS: dict[str, Callable[[LayerJob], None]] = {
    NONE: lambda job: None,
    WEIGHT_ONLY: _weight_only,
    FP8: _fp8,
    SMOOTHQUANT: lambda job: (_sq_plugin if job.settings.algorithm.sq_plugin else _sq_modelopt)(job),
    AWQ: _awq,
}
# What TensorRT-LLM's checkpoint decides about the math (quant/projection.py): its converter multiplies
# W by 1/prequant (the plugin form keeps s in float32), trtllm-build fuses qkv and fc/gate into one FP8
# GEMM (one weight scale each), and it quantizes W8A16/W4A16 itself (only the scales are kept, for verify).
TRTLLM = Form(PREQUANT, fused_weight_scale=True, weight_only_codes=False)
TRTLLM_SQ_PLUGIN = Form(FLOAT, fused_weight_scale=True, weight_only_codes=False)


# ---- the stage ------------------------------------------------------------------------------------

def quantize_checkpoint(source_dir: Path, stats: CalibrationStats | None, settings: QuantSettings, dtype: str,
                        out_dir: Path, log: Callable[[str], None] = lambda _: None) -> QuantizedArtifact:
    """Write the quantize artifact for `source_dir` into `out_dir` (an existing, empty directory)."""
    if not settings.algorithm.trtllm_checkpoint:
        raise ValueError(f"algo {settings.algo} has no TensorRT-LLM checkpoint form")
    if settings.needs_statistics and stats is None:
        raise ValueError(f"algo {settings.algo} / kv_cache {settings.kv_cache} needs calibration statistics")
    cfg = read_model_config(source_dir)
    reader = SourceCheckpoint(source_dir)
    reader.validate(cfg)
    writer = ArtifactWriter(out_dir)
    layers: dict[int, tuple[TensorRule, ...]] = {}
    excluded: list[str] = []
    for index in range(cfg.num_hidden_layers):
        job = LayerJob(index, cfg, reader, getattr(torch, dtype), settings, stats, writer)
        WRITERS[settings.algorithm.family](job)
        if KV_CACHES[settings.kv_cache].quantized:
            _kv_cache(job)
        layers[index] = tuple(job.rules)
        excluded += job.excluded
        log(f"quantized layer {index + 1}/{cfg.num_hidden_layers}")
    writer.write_index()
    searched = stats.alpha_report() if stats is not None and is_auto(settings.smoothquant_alpha) else None
    section = tq.quantization_section(settings, searched["smoothquant_val"] if searched else None)
    artifact = QuantizedArtifact(settings.algo, settings.kv_cache, section, layers, dict(writer.tensors),
                                 tuple(excluded), dtype, searched)
    (out_dir / ARTIFACT_FILE).write_text(artifact.to_json(), encoding="utf-8")
    return artifact


def run_quantize(job: StageJob) -> None:
    """Build executor: quantize the source with the calibrate stage's statistics (if any)."""
    settings = QuantSettings.from_params(job.params)
    model = read_model_facts(job.inputs["convert"])
    stats = read_stats(job.inputs["calibrate"]) if "calibrate" in job.inputs else None
    quantize_checkpoint(job.inputs["source"], stats, settings, model["dtype"], job.out_dir)
