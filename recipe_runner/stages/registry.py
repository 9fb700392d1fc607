"""Every stage of the pipeline, one StageSpec each: the single table of what a stage is.

Plan, keys, the scheduler and its executors, `--until`, verify and publishing all read it, so a new
stage (a new output format, say) is one entry here plus the module that fills its entry. Data only:
the executors are named as "module:function" and imported when the stage runs, because most of
them import torch, which a warm no-op build never needs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from recipe_runner.recipe.model import freeze

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig
    from recipe_runner.trtllm.toolchain import Toolchain

GiB = 1 << 30


def _largest(m: "ModelConfig") -> int:  # the largest tensor in float32, the worst case while converting
    return max(m.vocab_size * m.hidden_size, m.intermediate_size * m.hidden_size) * 4


def _layer(m: "ModelConfig") -> int:  # one decoder layer's linears in float32
    return (4 * m.hidden_size * m.hidden_size + 3 * m.intermediate_size * m.hidden_size) * 4


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int  # enters the stage's key: bump it whenever its code changes what it writes
    run: str  # "module:function" filling the entry: f(job: StageJob)
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
    StageSpec("export-hf-modelopt", 3, "recipe_runner.stages.export_hf:run_export_hf",
              lambda m, w: 2 * _largest(m) + GiB, publishes="hf-modelopt", target="hf-modelopt"),
    StageSpec("export-hf-compressed-tensors", 3, "recipe_runner.stages.export_hf:run_export_hf",
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


@dataclass(frozen=True)
class StageJob:
    """All that a stage's run function receives. Nothing here names the recipe: params are exactly the
    key's params (as hashed), each input is what the key hashed for it, so a stage cannot read a field
    its key lacks (tests/test_stage_isolation.py runs every stage from a job alone)."""

    stage: str
    params: Mapping[str, Any]  # read-only, exactly the key's "params"
    inputs: Mapping[str, Path]  # the key's "inputs" by name: an upstream entry, the source dir, the calibration file
    input_keys: Mapping[str, str]  # the same names → the digests the key hashed
    out_dir: Path  # the entry's payload directory, empty
    workers: int = 1  # threads and processes; never changes the bytes
    toolchain: "Toolchain | None" = None  # build-engine only: its versions are in the key's tools

    @staticmethod
    def frozen_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
        """`params` as the key hashes them (through JSON), deeply read-only."""
        return freeze(json.loads(json.dumps(params, sort_keys=True)))


def stage_executor(name: str) -> Callable[[StageJob], None]:
    """The function that fills stage `name`'s cache entry (imported now)."""
    import importlib

    module, function = STAGES[name].run.split(":")
    return getattr(importlib.import_module(module), function)
