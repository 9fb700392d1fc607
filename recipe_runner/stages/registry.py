"""Every stage of the pipeline, one StageSpec each: the single table of what a stage is.

Plan, keys, the scheduler and its executors, `--until`, verify and publishing all read it, so a new
stage (a new output format, say) is one entry here plus the module that fills its entry. Data only:
the executors are named as "module:function" and imported when the stage runs, because most of
them import torch, which a warm no-op build never needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig

GiB = 1 << 30


def _largest(m: "ModelConfig") -> int:  # the largest tensor in float32, the worst case while converting
    return max(m.vocab_size * m.hidden_size, m.intermediate_size * m.hidden_size) * 4


def _layer(m: "ModelConfig") -> int:  # one decoder layer's linears in float32
    return (4 * m.hidden_size * m.hidden_size + 3 * m.intermediate_size * m.hidden_size) * 4


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int  # enters the stage's key: bump it whenever its code changes what it writes
    run: str  # "module:function" filling the entry: f(resolved, entries, data_dir, workers)
    memory: Callable[["ModelConfig", int], int]  # peak bytes, roughly (model, workers), for --max-memory
    publishes: str | None = None  # the folder of the output directory its entry is published as
    target: str | None = None  # the output target (output.targets) it writes, as verify names it
    until_alias: str | None = None  # another name `build --until` accepts for it


# In this order verify checks the targets: the first one's report is <output>/verify/verify.*,
# the others' <output>/verify/<target>/verify.*.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("convert", 1, "recipe_runner.stages.model_facts:run_convert", lambda m, w: GiB // 2),
    StageSpec("calibrate", 2, "recipe_runner.stages.calibrate:run_calibrate", lambda m, w: _layer(m) + 2 * GiB),
    StageSpec("quantize", 1, "recipe_runner.stages.quantize:run_quantize", lambda m, w: _layer(m) + 2 * GiB),
    StageSpec("shard", 1, "recipe_runner.stages.shard:run_shard", lambda m, w: w * (2 * _largest(m) + GiB),
              publishes="checkpoint", target="trtllm-checkpoint", until_alias="checkpoint"),
    StageSpec("export-hf-modelopt", 3, "recipe_runner.hfexport.export:run_export_hf_modelopt",
              lambda m, w: 2 * _largest(m) + GiB, publishes="hf-modelopt", target="hf-modelopt"),
    StageSpec("export-hf-compressed-tensors", 3, "recipe_runner.hfexport.export:run_export_hf_compressed_tensors",
              lambda m, w: 2 * _largest(m) + GiB, publishes="hf-compressed-tensors", target="hf-compressed-tensors"),
    StageSpec("verify", 4, "recipe_runner.stages.verify:run_verify", lambda m, w: _layer(m) + _largest(m) + GiB,
              publishes="verify"),
    # trtllm-build's memory is unknown here, so it runs alone under --max-memory
    StageSpec("build-engine", 2, "recipe_runner.stages.engine:run_engine", lambda m, w: 1 << 62,
              publishes="engine", until_alias="engine"),
)}

PUBLISHED = {name: spec.publishes for name, spec in STAGES.items() if spec.publishes}
VERIFIED_STAGES = tuple(name for name, spec in STAGES.items() if spec.target)
UNTIL_ALIASES = {spec.until_alias: name for name, spec in STAGES.items() if spec.until_alias}


def stage_executor(name: str) -> Callable:
    """The function that fills stage `name`'s cache entry (imported now)."""
    import importlib

    module, function = STAGES[name].run.split(":")
    return getattr(importlib.import_module(module), function)
