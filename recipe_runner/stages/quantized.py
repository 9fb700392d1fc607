"""The quantize stage's artifact, and how the shard planner cuts it per rank.

The artifact is a directory holding safetensors files of *unsharded* tensors, named after the HF
projection they come from (`model.layers.3.self_attn.q_proj.qweight`) or the TensorRT-LLM module
they belong to (`model.layers.3.attention.qkv.prequant_scaling_factor`), an index that makes it
readable by `SourceCheckpoint`, and `quantized.json`: the config.json `quantization` section and,
per layer, the rules that turn those tensors into per-rank checkpoint tensors.

A rule names one per-layer checkpoint tensor (below `transformer.layers.{i}.`) and how it is split:
  none  every rank gets the whole stored tensor (scalars, [out] scales of row-parallel linears,
        [in] pre-quant scales of column-parallel linears, smoothed norms)
  out   row blocks of each source projection for this rank (q/k/v heads with KV-head duplication,
        gate/up rows), concatenated; `pack` stored rows hold pack output rows (int4: 2)
  in    the rank's block of the input dimension (the last dim; `in_group` input channels per
        stored column for group scales)
`lead_one` writes the result as [1, n] (SmoothQuant plugin scales). "out" and "in" take the rank's
rows/columns from the projection's split in the model layout, through the same functions the shard
planner cuts the plain weights with (trtllm/sharding.py out_rows, in_cols). A rule replaces the
shard plan's tensor of the same name, or adds one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe_runner.hf.config import ModelConfig
from recipe_runner.stages.manifest import Concat, Read, Source, SourceTensor, TensorPlan
from recipe_runner.models import layout_for
from recipe_runner.trtllm.sharding import in_cols, out_rows

ARTIFACT_FILE = "quantized.json"
FORMAT = "recipe-runner/quantized/1"


@dataclass(frozen=True)
class TensorRule:
    suffix: str
    split: str  # "none", "out" or "in"
    sources: tuple[tuple[str, str], ...]  # (HF projection, artifact tensor); projection "" for none
    pack: int = 1
    in_group: int = 1
    lead_one: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"suffix": self.suffix, "split": self.split, "sources": [list(s) for s in self.sources],
                "pack": self.pack, "in_group": self.in_group, "lead_one": self.lead_one}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorRule":
        return cls(d["suffix"], d["split"], tuple((p, n) for p, n in d["sources"]), d["pack"], d["in_group"],
                   d["lead_one"])


@dataclass(frozen=True)
class QuantizedArtifact:
    algo: str
    kv_cache: str
    quant_config: dict[str, Any] = field(hash=False)
    layers: dict[int, tuple[TensorRule, ...]] = field(hash=False)
    tensors: dict[str, SourceTensor] = field(hash=False)
    excluded: tuple[str, ...] = ()  # TensorRT-LLM modules left unquantized (global layer indices)
    dtype: str = "float16"  # the checkpoint dtype the tensors were made for
    smoothquant: dict[str, Any] | None = field(default=None, hash=False)  # smoothquant_alpha auto: smoothquant.json

    def to_json(self) -> str:
        data = {
            "format": FORMAT, "algo": self.algo, "kv_cache": self.kv_cache, "quant_config": self.quant_config,
            "dtype": self.dtype,
            "excluded": list(self.excluded),
            "layers": {str(i): [r.to_dict() for r in rules] for i, rules in sorted(self.layers.items())},
            "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape)} for n, t in sorted(self.tensors.items())},
        }
        if self.smoothquant is not None:  # only then: other artifacts keep their bytes
            data["smoothquant"] = self.smoothquant
        return json.dumps(data, sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "QuantizedArtifact":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} artifact: format={d.get('format')!r}")
        return cls(d["algo"], d["kv_cache"], d["quant_config"],
                   {int(i): tuple(TensorRule.from_dict(r) for r in rules) for i, rules in d["layers"].items()},
                   {n: SourceTensor(t["dtype"], tuple(t["shape"])) for n, t in d["tensors"].items()},
                   tuple(d["excluded"]), d["dtype"], d.get("smoothquant"))


def read_artifact(directory: Path) -> QuantizedArtifact:
    return QuantizedArtifact.from_json((Path(directory) / ARTIFACT_FILE).read_text(encoding="utf-8"))


# ---- per-rank expansion ---------------------------------------------------------------------------

def _divide(value: int, by: int, what: str) -> int:
    if value % by:
        raise ValueError(f"{what}: {value} is not a multiple of {by}")
    return value // by


def rank_tensor(rule: TensorRule, artifact: QuantizedArtifact, cfg: ModelConfig, tp: int, tp_rank: int,
                local: int) -> TensorPlan:
    """The checkpoint tensor `rule` describes, for one rank and local layer index."""
    layout = layout_for(cfg)
    name = layout.trtllm_layer_tensor(local, rule.suffix)
    stored = {n: artifact.tensors[n] for _, n in rule.sources}
    dtype = {t.dtype for t in stored.values()}
    if len(dtype) != 1:
        raise ValueError(f"{name}: sources of different dtypes {sorted(dtype)}")
    source: Source
    if rule.split == "none":
        (_, tensor), = rule.sources
        source, shape = Read(tensor), stored[tensor].shape
    elif rule.split == "out":
        parts, rows = [], 0
        for projection, tensor in rule.sources:
            r0, r1 = out_rows(layout.projection(projection), cfg, tp, tp_rank)  # the shard planner's rule
            a, b = _divide(r0, rule.pack, name), _divide(r1, rule.pack, name)
            parts.append(Read(tensor, 0, a, b))
            rows += b - a
        source = parts[0] if len(parts) == 1 else Concat(tuple(parts))
        shape = (rows, *stored[rule.sources[0][1]].shape[1:])
    elif rule.split == "in":
        (projection, tensor), = rule.sources
        full = stored[tensor].shape
        c0, c1 = in_cols(layout.projection(projection), cfg, tp, tp_rank)
        a, b = _divide(c0, rule.in_group, name), _divide(c1, rule.in_group, name)
        dim = len(full) - 1
        source = Read(tensor, dim, a, b)
        shape = (*full[:-1], b - a)
    else:
        raise ValueError(f"{name}: unknown split {rule.split!r}")
    if rule.lead_one:
        n = 1
        for s in shape:
            n *= s
        shape = (1, n)
    return TensorPlan(name, tuple(shape), dtype.pop(), source, _note(rule))


def _note(rule: TensorRule) -> str:
    return {"none": "quantize stage: whole", "out": "quantize stage: output rows of this rank",
            "in": "quantize stage: input columns of this rank"}[rule.split]


def apply_layer_rules(plans: list[TensorPlan], artifact: QuantizedArtifact, cfg: ModelConfig, tp: int,
                      tp_rank: int, layer: int, local: int) -> list[TensorPlan]:
    """The shard plan of one layer with the artifact's tensors replacing or joining it."""
    out = list(plans)
    index = {p.name: i for i, p in enumerate(out)}
    for rule in artifact.layers.get(layer, ()):
        plan = rank_tensor(rule, artifact, cfg, tp, tp_rank, local)
        if plan.name in index:
            out[index[plan.name]] = plan
        else:
            index[plan.name] = len(out)
            out.append(plan)
    return out
