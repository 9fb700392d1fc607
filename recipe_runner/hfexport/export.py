"""Export stage: a quantized Hugging Face checkpoint (hf-modelopt or hf-compressed-tensors).

Inputs are the source weights, the convert stage's dtype and the calibrate stage's statistics, so
one calibration serves every target. Tensors keep their HF names, unsharded for tensor parallelism
(the consumers slice at load time), and are written one at a time with the streaming safetensors
writer into files of at most `max_shard_bytes` (with model.safetensors.index.json when several).
A quantized tensor is computed when the writer asks for it (the weight and its scales of one
projection are cached until the next projection), from small per-group values (input scales,
NVFP4 global scales, smoothing factors) kept per layer. The math is quant/projection.py's (shared
with the quantize stage); each algo's tensor set is its `hf_tensors` (quant/algorithms.py), from the
docs/format/hf-quantized-checkpoint.md §1.3, §1.4, §2.3 and §3.
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
from recipe_runner.quant import nvfp4
from recipe_runner.quant.algorithms import KV_CACHES
from recipe_runner.quant.chunks import cast_rows, map_row_chunks, row_slices
from recipe_runner.quant.fp8 import fp8_scale
from recipe_runner.quant.packing import pack_int32, pack_int4_rows
from recipe_runner.quant.projection import FOLD, NO_SCALING, Form, GroupScaling, ProjectionQuantizer, Spec
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.quant.sq_auto import REPORT_FILE as SQ_REPORT_FILE, is_auto
from recipe_runner.io.safetensors_writer import Block, SafetensorsStreamWriter, TensorSpec

MAX_SHARD_BYTES = 10 * 10**9  # ModelOpt's shard size (docs/format/hf-quantized-checkpoint.md §1.2)
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
PROJECTIONS = LLAMA.projection_names  # every architecture accepted today has LLaMA's layout (models/)
NORMS = {g.projections: g.norm.hf_weight for g in LLAMA.groups if g.norm is not None}


def _group(projection: str) -> tuple[str, ...]:
    return LLAMA.group_of(projection).projections


# What each HF format decides about the math (quant/projection.py): both fold the smoothing into the
# norms as ModelOpt's unified export does; compressed-tensors smooths only what a norm absorbs and
# keeps pack-quantized scales in the model dtype (llm-compressor's layout,
# docs/format/hf-quantized-checkpoint.md §2.3).
FORMS = {HF_MODELOPT: Form(FOLD),
         HF_COMPRESSED_TENSORS: Form(FOLD, smooth_unfolded=False, model_dtype_int_scales=True)}


@dataclass(frozen=True)
class _Transform:
    """How a format stores one QuantizedProjection field: the stored tensor, and its (dtype, shape) known
    before anything is computed (the file headers are planned first). Both take the weight bits."""

    tensor: Callable[[torch.Tensor, int], torch.Tensor]
    spec: Callable[[Spec, int], Spec]  # (dtype, shape) of the field -> (dtype, shape) stored


TRANSFORMS = {
    "": _Transform(lambda t, bits: t, lambda s, bits: s),
    "e2m1": _Transform(lambda t, bits: nvfp4.pack(t), lambda s, bits: (torch.uint8, (s[1][0], s[1][1] // 2))),
    "int4_rows": _Transform(lambda t, bits: pack_int4_rows(t).view(torch.uint8),
                            lambda s, bits: (torch.uint8, (s[1][0] // 2, s[1][1]))),
    "int32": _Transform(pack_int32, lambda s, bits: (torch.int32, (s[1][0], s[1][1] * bits // 32))),
    "shape": _Transform(lambda t, bits: torch.tensor(list(t.shape), dtype=torch.int64),
                        lambda s, bits: (torch.int64, (2,))),
    "column": _Transform(lambda t, bits: t.reshape(t.shape[0], -1),  # [out] -> [out, 1]
                         lambda s, bits: (s[0], (s[1][0], s[1][1] if len(s[1]) > 1 else 1))),
    "vector": _Transform(lambda t, bits: t.reshape(1), lambda s, bits: (s[0], (1,))),
    "reciprocal": _Transform(lambda t, bits: (1.0 / t).reshape(1), lambda s, bits: (s[0], (1,))),
}


def tensor_rows(settings: QuantSettings, target: str) -> tuple[tuple[str, str, _Transform], ...]:
    """(suffix, QuantizedProjection field, transform) of one quantized projection of `target`, in order."""
    rows = settings.algorithm.hf_tensors.get(target)
    if rows is None:
        raise ValueError(f"{target}: algo {settings.algo} cannot be exported")
    return tuple((suffix, *_split(source)) for suffix, source in rows)


def _split(source: str) -> tuple[str, _Transform]:
    field, _, transform = source.partition(":")
    return field, TRANSFORMS[transform]


class LayerExport:
    """One decoder layer's exported tensors, computed on demand."""

    def __init__(self, index: int, reader: SourceCheckpoint, dtype: torch.dtype, settings: QuantSettings,
                 target: str, stats: CalibrationStats | None):
        self.index, self.reader, self.dtype, self.s, self.stats = index, reader, dtype, settings, stats
        self.quantizer = ProjectionQuantizer(settings, FORMS[target], dtype)
        self.rows = tensor_rows(settings, target) if settings.algorithm.quantizes_weights else ()
        self._groups: dict[tuple[str, ...], GroupScaling] = {}
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def quantizes(self, projection: str) -> bool:
        """Whether this projection gets quantized weights (algo none: the KV-only checkpoint)."""
        return self.s.algorithm.quantizes_weights and not projection_excluded(self.s.exclude_modules, self.index,
                                                                              projection)

    def weight(self, projection: str, cast: bool = True) -> torch.Tensor:
        """The source weight rounded to the model dtype, as a fresh float32 tensor unless `cast` is false
        (quant/chunks.py cast_rows: row chunks on every core, only the result as big as the weight)."""
        return cast_rows(self.reader, LLAMA.hf_layer_tensor(self.index, projection + ".weight"), self.dtype,
                         torch.float32 if cast else self.dtype)

    def model_weight(self, projection: str) -> torch.Tensor:
        """The source weight in the model dtype, read-only: mapped (no copy) when stored in that dtype; for
        the group statistics, whose max |W| is the same in float32."""
        name = LLAMA.hf_layer_tensor(self.index, projection + ".weight")
        return self.reader.rows(name, 0, self.reader.shape(name)[0]).to(self.dtype)

    def _source_norm(self, norm: str) -> torch.Tensor:
        return self.reader.read(LLAMA.hf_layer_tensor(self.index, norm)).to(self.dtype)

    def group(self, group: tuple[str, ...]) -> GroupScaling:
        """The input group's shared values (smoothing, NVFP4's ws2, input scales), computed once."""
        if group not in self._groups:
            if not self.quantizes(group[0]):  # exclusion never splits a group (plan-time rule)
                self._groups[group] = NO_SCALING
            else:
                norm = NORMS.get(group)
                read_norm = (lambda: self._source_norm(norm).float()) if norm else None
                self._groups[group] = self.quantizer.scale_group(self.stats, self.index, group,
                                                                 self.model_weight, read_norm)
        return self._groups[group]

    def norm(self, norm: str) -> torch.Tensor:
        """A norm weight, with the smoothing of the group it feeds folded in (model dtype)."""
        group = next(g for g, n in NORMS.items() if n == norm)
        smoothing = self.group(group).smoothing
        return smoothing.norm if smoothing is not None and smoothing.norm is not None else self._source_norm(norm)

    def projection(self, projection: str) -> dict[str, torch.Tensor]:
        """suffix -> tensor of one projection (weight, scales, KV scales)."""
        if self._last is None or self._last[0] != projection:
            self._last = (projection, self._compute(projection))
        return self._last[1]

    def _compute(self, projection: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if not self.quantizes(projection):
            out["weight"] = self.weight(projection, cast=False)
        else:
            group = self.group(_group(projection))
            read = self.model_weight if self.quantizer.takes_model_dtype(group) else self.weight
            q = self.quantizer.quantize(read(projection), group)
            bits = self.s.algorithm.weight_bits
            for suffix, field, transform in self.rows:
                value = getattr(q, field)
                if value is not None:
                    out[suffix] = transform.tensor(value, bits)
        if _writes_kv_scale(self.s, projection):
            # k_scale: amax of K after RoPE (the key states the cache holds; RoPE can grow |K| up to √2 over
            # the k_proj output); v_scale: amax of the v_proj output (V is not rotated)
            y = (self.stats.k_after_rope_amax(self.index) if projection == LLAMA.key
                 else float(self.stats.linear(self.index, projection).y_absmax.max()))
            out[projection[-6] + "_scale"] = fp8_scale(y).reshape(())
        return out


def _writes_kv_scale(settings: QuantSettings, projection: str) -> bool:
    return KV_CACHES[settings.kv_cache].hf_kv_algo is not None and projection in (LLAMA.key, LLAMA.value)


# ---- planning the files --------------------------------------------------------------------------

def _projection_specs(layer: LayerExport, projection: str, shape: tuple[int, int]) -> dict[str, Spec]:
    """suffix -> (dtype, shape) of what `LayerExport._compute` returns, known without computing it."""
    if not layer.quantizes(projection):
        specs = {"weight": (layer.dtype, shape)}
    else:
        fields = layer.quantizer.specs(shape, follows_norm=_group(projection) in NORMS)
        bits = layer.s.algorithm.weight_bits
        specs = {suffix: transform.spec(fields[field], bits) for suffix, field, transform in layer.rows
                 if field in fields}
    if _writes_kv_scale(layer.s, projection):
        specs[projection[-6] + "_scale"] = (torch.float32, ())
    return specs


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


def plan_export_tensors(reader: SourceCheckpoint, num_layers: int, dtype: torch.dtype, settings: QuantSettings,
                        target: str, stats: CalibrationStats | None) -> list[Planned]:
    """Every tensor of the exported checkpoint, in the order written, each with how to produce it."""
    layers = [LayerExport(i, reader, dtype, settings, target, stats) for i in range(num_layers)]
    planned: list[Planned] = []
    for name in reader.names():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
            layer, rest = layers[int(parts[2])], ".".join(parts[3:])
            proj = rest.removesuffix(".weight")
            if proj in PROJECTIONS and rest.endswith(".weight"):
                shape = tuple(reader.shape(name))
                for suffix, (dt, sh) in _projection_specs(layer, proj, shape).items():
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
    cols = math.prod(shape[1:])
    for block in row_slices(rows, cols):  # blocks of CHUNK_ELEMENTS, each cast on every core
        out = torch.empty((block.stop - block.start, *shape[1:]), dtype=dtype)

        def cast(chunk: slice) -> None:  # from the mapped source, no copy in between; copy_ casts as .to does
            out[chunk].copy_(reader.rows(name, block.start + chunk.start, block.start + chunk.stop))

        map_row_chunks(cast, out.shape[0], cols)
        yield out
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


def export_checkpoint(source_dir: Path, stats: CalibrationStats | None, settings: QuantSettings, target: str,
                      dtype: str, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                      log: Callable[[str], None] = lambda _: None) -> None:
    """Write the checkpoint for `target` into `out_dir` (an existing, empty directory)."""
    if target not in (HF_MODELOPT, HF_COMPRESSED_TENSORS):
        raise ValueError(f"unknown HF target {target!r}")
    if target not in settings.algorithm.hf_loaders:  # targets.py refuses these at plan time
        raise ValueError(f"{target}: algo {settings.algo} cannot be exported")
    cfg = read_model_config(source_dir)
    reader = SourceCheckpoint(source_dir)
    reader.validate(cfg)
    torch_dtype = getattr(torch, dtype)
    planned = plan_export_tensors(reader, cfg.num_hidden_layers, torch_dtype, settings, target, stats)
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
                writer.write(spec.name, produced.contiguous())  # refuses a dtype or shape other than planned
                del produced
                reader.release()
        weight_map.update({p.name: file_name for p in members})
        log(f"wrote {file_name}")
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in planned)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    configs.write_configs(source_dir, out_dir, settings, target, dtype, cfg.num_hidden_layers)
    if stats is not None and is_auto(settings.smoothquant_alpha):  # the searched α, for users (no consumer reads it)
        report = json.dumps(stats.alpha_report(), indent=1, sort_keys=True) + "\n"
        (out_dir / SQ_REPORT_FILE).write_text(report, encoding="utf-8")
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)


