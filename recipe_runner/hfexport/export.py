"""Export stage: a quantized Hugging Face checkpoint (hf-modelopt or hf-compressed-tensors).

Inputs are the source weights, the convert stage's dtype and the calibrate stage's statistics, so
one calibration serves every target. Tensors keep their HF names, unsharded for tensor parallelism
(the consumers slice at load time), and are written one at a time with the streaming safetensors
writer into files of at most `max_shard_bytes` (with model.safetensors.index.json when several).
A quantized tensor is computed when the writer asks for it (the weight and its scales of one
projection are cached until the next projection), from small per-group values (input scales,
NVFP4 global scales, smoothing factors) kept per layer. Math in float32; formulas and tensor sets
from the hf-quantized-checkpoint spec §1.3, §1.4, §2.3 and §3.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from recipe_runner.calibration.stats import CalibrationStats
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.hfexport import configs
from recipe_runner.hfexport.exclusion import projection_excluded
from recipe_runner.hfexport.targets import HF_COMPRESSED_TENSORS, HF_MODELOPT
from recipe_runner.models.llama import LLAMA
from recipe_runner.quant import awq, nvfp4, smoothquant as sq
from recipe_runner.quant.chunks import row_slices
from recipe_runner.quant.fp8 import E4M3_MAX, MIN_AMAX, quantize_fp8
from recipe_runner.quant.reductions import absmax
from recipe_runner.quant.packing import pack_int4_rows
from recipe_runner.io.safetensors_writer import Block, SafetensorsStreamWriter, TensorSpec

MAX_SHARD_BYTES = 10 * 10**9  # ModelOpt's shard size (spec §1.2)
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
PROJECTIONS = LLAMA.projection_names  # every architecture accepted today has LLaMA's layout (models/)
NORMS = {g.projections: g.norm.hf_weight for g in LLAMA.groups if g.norm is not None}
PACK_BITS = {"w8a16": 8, "w4a16": 4, "w4a16_awq": 4}


@dataclass(frozen=True)
class ExportSettings:
    target: str
    algo: str
    kv_cache: str = "none"
    group_size: int = 128
    smoothquant_alpha: float = 0.5
    # fnmatch patterns over TensorRT-LLM module names (hfexport/exclusion.py); lm_head is never quantized
    exclude_modules: tuple[str, ...] = ("lm_head",)

    def quantizes(self, layer: int, projection: str) -> bool:
        """Whether this projection gets quantized weights (algo none: the KV-only checkpoint)."""
        return self.algo != "none" and not projection_excluded(self.exclude_modules, layer, projection)


def _group(projection: str) -> tuple[str, ...]:
    return LLAMA.group_of(projection).projections


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


class LayerExport:
    """One decoder layer's exported tensors, computed on demand."""

    def __init__(self, index: int, reader: SourceCheckpoint, dtype: torch.dtype, settings: ExportSettings,
                 stats: CalibrationStats | None):
        self.index, self.reader, self.dtype, self.s, self.stats = index, reader, dtype, settings, stats
        self._groups: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def weight(self, projection: str, cast: bool = True) -> torch.Tensor:
        """The source weight rounded to the model dtype, as a fresh float32 tensor unless `cast` is
        false; read in row chunks, so only the float32 result is as big as the weight."""
        name = LLAMA.hf_layer_tensor(self.index, projection + ".weight")
        rows, cols = self.reader.shape(name)
        w = torch.empty((rows, cols), dtype=torch.float32 if cast else self.dtype)
        for chunk in row_slices(rows, cols):
            w[chunk] = self.reader.read(name, 0, chunk.start, chunk.stop).to(self.dtype)
            self.reader.release()
        return w

    def x_amax(self, projection: str) -> torch.Tensor:
        assert self.stats is not None, "calibration statistics needed"
        return self.stats.linear(self.index, projection).x_absmax.float()

    def group(self, group: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Small per-input-group values: smoothing `pqs` (W' = W/pqs, x' = x⊙pqs), input scales, NVFP4 ws2."""
        if group not in self._groups:
            self._groups[group] = self._group_values(group)
        return self._groups[group]

    def _group_values(self, group: tuple[str, ...]) -> dict[str, torch.Tensor]:
        algo, target, v = self.s.algo, self.s.target, {}
        if not self.s.quantizes(self.index, group[0]):  # exclusion never splits a group (plan-time rule)
            return v
        folded = group in NORMS
        if algo == "w4a16_awq" and (folded or target == HF_MODELOPT):
            v["pqs"] = (1.0 / self.stats.awq_scales(self.index, group[0])).to(self.dtype)
        elif algo.startswith("w8a8_sq") and folded:
            colmax = torch.stack([sq.column_absmax(self.weight(p)) for p in group]).amax(dim=0)
            s = sq.factors_from_column_max(self.x_amax(group[0]), colmax, self.s.smoothquant_alpha)
            v["pqs"] = (1.0 / s).to(self.dtype)
        if "pqs" in v and folded:  # the norm applies exactly f16(ln·pqs)/ln: divide W by that
            ln = self.reader.read(LLAMA.hf_layer_tensor(self.index, NORMS[group])).to(self.dtype).float()
            v["norm"] = (ln * v["pqs"].float()).to(self.dtype)
            v["pqs_eff"] = torch.where(ln != 0, v["norm"].float() / ln, v["pqs"].float())
        if algo == "fp8":
            v["input_scale"] = _scalar(max(float(self.x_amax(group[0]).max()), MIN_AMAX) / E4M3_MAX)
        elif algo == "nvfp4":
            v["ws2"] = nvfp4.global_scale(max(float(absmax(self.weight(p, cast=False))) for p in group))
            v["input_scale"] = nvfp4.global_scale(float(self.x_amax(group[0]).max()))
        elif algo == "w8a8_sq_per_channel":
            x = self.x_amax(group[0]) * (v["pqs_eff"] if "pqs_eff" in v else 1.0)
            v["input_scale"] = torch.tensor([max(float(x.max()), sq.MIN_RANGE) / sq.INT8_MAX])
        return v

    def norm(self, norm: str) -> torch.Tensor:
        """A norm weight, with the smoothing of the group it feeds folded in (model dtype)."""
        group = next(g for g, n in NORMS.items() if n == norm)
        folded = self.group(group).get("norm")
        return folded if folded is not None else self.reader.read(LLAMA.hf_layer_tensor(self.index, norm)).to(self.dtype)

    def projection(self, projection: str) -> dict[str, torch.Tensor]:
        """suffix -> tensor of one projection (weight, scales, KV scales)."""
        if self._last is None or self._last[0] != projection:
            self._last = (projection, self._compute(projection))
        return self._last[1]

    def _compute(self, projection: str) -> dict[str, torch.Tensor]:
        algo, ct = self.s.algo, self.s.target == HF_COMPRESSED_TENSORS
        g = self.group(_group(projection))
        w = self.weight(projection)
        if "pqs" in g:
            w /= g.get("pqs_eff", g["pqs"].float())[None, :]
        out: dict[str, torch.Tensor] = {}
        if not self.s.quantizes(self.index, projection):
            out["weight"] = w.to(self.dtype)
        elif algo == "fp8":
            ws = _scalar(max(float(absmax(w)), MIN_AMAX) / E4M3_MAX)
            out.update(weight=quantize_fp8(w, ws), weight_scale=ws, input_scale=g["input_scale"])
        elif algo == "nvfp4":
            scales = nvfp4.block_scales(w, g["ws2"])
            packed = nvfp4.pack(nvfp4.quantize(w, scales, g["ws2"]))
            if ct:
                out.update(weight_packed=packed, weight_scale=scales,
                           weight_global_scale=(1.0 / g["ws2"]).reshape(1),
                           input_global_scale=(1.0 / g["input_scale"]).reshape(1))
            else:
                out.update(weight=packed, weight_scale=scales, weight_scale_2=g["ws2"], input_scale=g["input_scale"])
        elif ct and algo in PACK_BITS:
            out.update(_pack_quantized(w, PACK_BITS[algo], self.s.group_size if algo == "w4a16_awq" else None,
                                       self.dtype))
        elif ct:  # SmoothQuant → int-quantized W8A8
            scale = (absmax(w, dim=1) / sq.INT8_MAX).clamp(min=sq.MIN_RANGE)
            out.update(weight=_int_codes(w, scale, 8), weight_scale=scale[:, None].contiguous())
            if "input_scale" in g:
                out["input_scale"] = g["input_scale"]
        elif algo == "w8a16":
            scale = (absmax(w, dim=1) / sq.INT8_MAX).clamp(min=sq.MIN_RANGE)
            out.update(weight=_int_codes(w, scale, 8), weight_scale=scale)
        elif algo == "w4a16_awq":
            scales = awq.group_scales(w, self.s.group_size)
            codes = awq.quantize_groupwise(w, scales, self.s.group_size)
            out.update(weight=pack_int4_rows(codes).view(torch.uint8), weight_scale=scales)
            if _group(projection) not in NORMS:
                out["pre_quant_scale"] = g["pqs"]
        else:
            raise ValueError(f"{self.s.target}: algo {algo} cannot be exported")
        if self.s.kv_cache == "fp8" and projection in (LLAMA.key, LLAMA.value):
            # k_scale: amax of K after RoPE (the key states the cache holds; RoPE can grow |K| up to √2 over
            # the k_proj output); v_scale: amax of the v_proj output (V is not rotated)
            y = (self.stats.k_after_rope_amax(self.index) if projection == LLAMA.key
                 else float(self.stats.linear(self.index, projection).y_absmax.max()))
            out[projection[-6] + "_scale"] = _scalar(max(y, MIN_AMAX) / E4M3_MAX)
        return out


def _int_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [out, in] = clamp(round(w / scale)) to the signed `bits` range; `scale` is [out] (channel) or
    [out, in/group]. Row chunks keep the float32 temporaries small (quant/chunks.py)."""
    out_dim, in_dim = w.shape
    s = scale.float().reshape(out_dim, -1)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.empty(w.shape, dtype=torch.int8)
    for rows in row_slices(out_dim, in_dim):
        q = w[rows].reshape(-1, s.shape[1], in_dim // s.shape[1]) / s[rows, :, None]
        codes[rows] = q.round_().clamp_(lo, hi).reshape(-1, in_dim).to(torch.int8)
    return codes


def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [out, in] → int32 [out, in·bits/32]: code + 2^(bits-1), element k at bit k·bits."""
    out_dim, in_dim = codes.shape
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = torch.empty((out_dim, in_dim // per), dtype=torch.int32)
    for rows in row_slices(out_dim, in_dim):
        unsigned = (codes[rows].to(torch.int64) + (1 << (bits - 1))).reshape(-1, in_dim // per, per)
        packed = (unsigned << shifts).sum(dim=2)
        words[rows] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return words


def _pack_quantized(w: torch.Tensor, bits: int, group: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: codes packed along in into int32 (see _pack_int32); scale [out, 1]
    (channel) or [out, in/group] in the model dtype; weight_shape int64 [2]."""
    out_dim, in_dim = w.shape
    qmax = (1 << (bits - 1)) - 1
    scale = (absmax(w.reshape(out_dim, -1, group or in_dim), dim=2) / qmax).clamp(min=MIN_AMAX).to(dtype)
    return {"weight_packed": _pack_int32(_int_codes(w, scale, bits), bits), "weight_scale": scale,
            "weight_shape": torch.tensor([out_dim, in_dim], dtype=torch.int64)}


# ---- planning the files --------------------------------------------------------------------------

def _projection_specs(settings: ExportSettings, layer: int, projection: str, shape: tuple[int, int],
                      dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix -> (dtype, shape) of what `LayerExport._compute` returns, known without computing it."""
    o, i = shape
    f32, algo, g = torch.float32, settings.algo, settings.group_size
    ct = settings.target == HF_COMPRESSED_TENSORS
    if not settings.quantizes(layer, projection):
        s = {"weight": (dtype, (o, i))}
    elif algo == "fp8":
        s = {"weight": (torch.float8_e4m3fn, (o, i)), "weight_scale": (f32, ()), "input_scale": (f32, ())}
    elif algo == "nvfp4":
        s = {"weight_scale": (torch.float8_e4m3fn, (o, i // 16))}
        s.update({"weight_packed": (torch.uint8, (o, i // 2)), "weight_global_scale": (f32, (1,)),
                  "input_global_scale": (f32, (1,))} if ct else
                 {"weight": (torch.uint8, (o, i // 2)), "weight_scale_2": (f32, ()), "input_scale": (f32, ())})
    elif ct and algo in PACK_BITS:
        bits = PACK_BITS[algo]
        cols = i // g if algo == "w4a16_awq" else 1
        s = {"weight_packed": (torch.int32, (o, i * bits // 32)), "weight_scale": (dtype, (o, cols)),
             "weight_shape": (torch.int64, (2,))}
    elif ct:
        s = {"weight": (torch.int8, (o, i)), "weight_scale": (f32, (o, 1))}
        if algo == "w8a8_sq_per_channel":
            s["input_scale"] = (f32, (1,))
    elif algo == "w8a16":
        s = {"weight": (torch.int8, (o, i)), "weight_scale": (f32, (o,))}
    else:  # w4a16_awq, hf-modelopt
        s = {"weight": (torch.uint8, (o // 2, i)), "weight_scale": (f32, (o, i // g))}
        if _group(projection) not in NORMS:
            s["pre_quant_scale"] = (dtype, (i,))
    if settings.kv_cache == "fp8" and projection in (LLAMA.key, LLAMA.value):
        s[projection[-6] + "_scale"] = (f32, ())
    return s


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor | Iterable[Block]]  # a computed tensor, or blocks copied from the source

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_tensors(reader: SourceCheckpoint, num_layers: int, dtype: torch.dtype, settings: ExportSettings,
                 stats: CalibrationStats | None) -> list[Planned]:
    layers = [LayerExport(i, reader, dtype, settings, stats) for i in range(num_layers)]
    planned: list[Planned] = []
    for name in reader.names():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
            layer, rest = layers[int(parts[2])], ".".join(parts[3:])
            proj = rest.removesuffix(".weight")
            if proj in PROJECTIONS and rest.endswith(".weight"):
                shape = tuple(reader.shape(name))
                for suffix, (dt, sh) in _projection_specs(settings, layer.index, proj, shape, dtype).items():
                    planned.append(Planned(f"model.layers.{layer.index}.{proj}.{suffix}", dt, sh,
                                           lambda l=layer, p=proj, s=suffix: l.projection(p)[s]))
                continue
            if rest in NORMS.values():
                planned.append(Planned(name, dtype, tuple(reader.shape(name)), lambda l=layer, r=rest: l.norm(r)))
                continue
        src = reader.dtype(name)
        out_dtype = dtype if src.is_floating_point else src
        planned.append(Planned(name, out_dtype, tuple(reader.shape(name)),
                               lambda n=name, d=out_dtype: _source_blocks(reader, n, d)))
    return planned


def _source_blocks(reader: SourceCheckpoint, name: str, dtype: torch.dtype) -> Iterator[Block]:
    """A tensor copied from the source (embeddings, lm_head, final norm) in `dtype`: its bytes verbatim
    when the dtype matches, else row chunks cast, so a 128k x 8k embedding never sits in memory."""
    shape = reader.shape(name)
    rows = shape[0] if shape else 1
    if reader.dtype(name) == dtype:
        whole = reader.row_range(name, 0, rows) if shape else None
        if whole is not None:
            yield whole
            return
    if len(shape) < 2:
        yield reader.read(name).to(dtype)
        return
    for chunk in row_slices(rows, math.prod(shape[1:])):
        yield reader.read(name, 0, chunk.start, chunk.stop).to(dtype)
        reader.release()


def _files(planned: list[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    files: list[list[Planned]] = [[]]
    size = 0
    for p in planned:
        if files[-1] and size + p.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(p)
        size += p.nbytes
    return files


def export_checkpoint(source_dir: Path, stats: CalibrationStats | None, settings: ExportSettings, dtype: str,
                      out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                      log: Callable[[str], None] = lambda _: None) -> None:
    """Write the checkpoint for `settings.target` into `out_dir` (an existing, empty directory)."""
    if settings.target not in (HF_MODELOPT, HF_COMPRESSED_TENSORS):
        raise ValueError(f"unknown HF target {settings.target!r}")
    cfg = read_model_config(source_dir)
    reader = SourceCheckpoint(source_dir)
    reader.validate(cfg)
    torch_dtype = getattr(torch, dtype)
    planned = plan_tensors(reader, cfg.num_hidden_layers, torch_dtype, settings, stats)
    files = _files(planned, max_shard_bytes)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    weight_map = {}
    for file_name, members in zip(names, files):
        by_name = {p.name: p for p in members}
        specs = [TensorSpec(p.name, p.dtype, p.shape) for p in members]
        # in the planned order, layer by layer: each projection is computed once (LayerExport keeps the last)
        with SafetensorsStreamWriter(out_dir / file_name, specs, {"format": "pt"}, keep_order=True) as writer:
            for spec in writer.layout.order:
                produced = by_name[spec.name].produce()
                if not isinstance(produced, torch.Tensor):
                    writer.write_blocks(spec.name, produced)
                    continue
                if produced.dtype != spec.dtype or tuple(produced.shape) != spec.shape:
                    raise AssertionError(f"{spec.name}: planned {spec.dtype} {spec.shape}, produced "
                                         f"{produced.dtype} {tuple(produced.shape)}")
                writer.write(spec.name, produced.contiguous())
                del produced
                reader.release()
        weight_map.update({p.name: file_name for p in members})
        log(f"wrote {file_name}")
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in planned)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    configs.write_configs(source_dir, out_dir, settings, dtype, cfg.num_hidden_layers)
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)


def settings_from_params(target: str, params: dict) -> ExportSettings:
    defaults = ExportSettings(target, params["algo"])  # the plan passes only the knobs the algo reads
    return ExportSettings(target, params["algo"], params["kv_cache"], params.get("group_size", defaults.group_size),
                          params.get("smoothquant_alpha", defaults.smoothquant_alpha),
                          tuple(params.get("exclude_modules", defaults.exclude_modules)))


def make_executor(target: str, stage: str):
    def run_export(resolved, entries: dict, data_dir: Path, workers: int) -> None:
        from recipe_runner.calibration.stats import read_stats
        from recipe_runner.stages.model_facts import MODEL_FILE

        settings = settings_from_params(target, dict(resolved.plan.stage(stage).params))
        model = json.loads((entries["convert"].path / MODEL_FILE).read_text(encoding="utf-8"))
        stats = read_stats(entries["calibrate"].path) if "calibrate" in entries else None
        export_checkpoint(resolved.source_dir, stats, settings, model["dtype"], data_dir)
    return run_export


# The export stages' executors (stages/registry.py names them)
run_export_hf_modelopt = make_executor(HF_MODELOPT, "export-hf-modelopt")
run_export_hf_compressed_tensors = make_executor(HF_COMPRESSED_TENSORS, "export-hf-compressed-tensors")
