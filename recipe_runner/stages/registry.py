"""Every stage of the pipeline, one StageSpec each: the single table of what a stage is.

Plan, keys, the scheduler and its executors, `--until`, verify and publishing all read it, so a new
stage (a new output format, say) is one entry here plus the module that fills its entry. A spec says
whether a recipe uses the stage and, if so, its inputs and exactly the recipe fields its result depends
on (`uses`), which become its key's params: all its run function ever sees (StageJob). The executors
are named as "module:function" and imported when the stage runs, because most of them import torch,
which a warm no-op build never needs.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from recipe_runner.io.work_progress import NO_PROGRESS, WorkProgress
from recipe_runner.hfexport.targets import HF_COMPRESSED_TENSORS, HF_MODELOPT, TRTLLM_CHECKPOINT, output_targets
from recipe_runner.quant.algorithms import ALGORITHMS, SMOOTHQUANT, needs_calibration, quantizes, statistics_families
from recipe_runner.quant.sq_auto import AlphaSearch, is_auto
from recipe_runner.recipe.model import freeze, thaw
from recipe_runner.trtllm.releases import FIELD as RELEASE_FIELD, newest

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig
    from recipe_runner.trtllm.toolchain import Toolchain

GiB = 1 << 30


def calibration_device_bytes(m: "ModelConfig", params: Mapping[str, Any], devices: int) -> int:
    """The calibrate stage's peak on each device, roughly: one decoder layer in float32 plus that device's
    share of the calibration activations (every sample's hidden states, at most max_seq_len tokens each);
    with smoothquant_alpha auto, on the first device also every α candidate's hidden states for the
    selection tokens and the layer's fake-quantized copy (calibration/alpha_select.py)."""
    tokens = params["num_samples"] * params["max_seq_len"]
    peak = _layer(m) + -(-tokens // max(devices, 1)) * m.hidden_size * 4
    search = params.get("smoothquant_search")
    if search is not None:
        candidates = len(AlphaSearch.from_params(search).candidates())
        peak += candidates * search["select_tokens"] * m.hidden_size * 4 + _layer(m)
    return peak


def _largest(m: "ModelConfig") -> int:  # the largest tensor in float32, the worst case while converting
    return max(m.vocab_size * m.hidden_size, m.intermediate_size * m.hidden_size) * 4


def _layer(m: "ModelConfig") -> int:  # one decoder layer's linears in float32
    return (4 * m.hidden_size * m.hidden_size + 3 * m.intermediate_size * m.hidden_size) * 4


@dataclass(frozen=True)
class StageUse:
    """How one recipe uses a stage."""

    inputs: tuple[str, ...]  # upstream stages, or "source" / "calibration-data" / "verify-data" / "tokenizer"
    params: dict[str, Any]  # exactly the recipe fields its result depends on
    after: tuple[str, ...] = ()  # stages that must succeed first without entering the key


Recipe = Mapping[str, Any]  # a normalized recipe's data


def _pick(section: Mapping[str, Any] | None, *keys: str) -> dict:
    section = section or {}
    return {k: thaw(section[k]) for k in keys if k in section}


def _calibrated(d: Recipe) -> bool:
    return needs_calibration(d["quantization"]["algo"], d["quantization"]["kv_cache"])


def _quantized(d: Recipe) -> bool:
    return quantizes(d["quantization"]["algo"], d["quantization"]["kv_cache"])


def _quantizing_inputs(d: Recipe) -> tuple[str, ...]:
    """The stages that quantize read the source weights, beside the model facts and statistics."""
    return ("convert", "calibrate", "source") if _calibrated(d) else ("convert", "source")


def _convert(d: Recipe) -> StageUse:
    return StageUse(("source",), _pick(d["source"], "dtype", "trust_remote_code"))


def _calibrate(d: Recipe) -> StageUse | None:
    if not _calibrated(d):
        return None
    quant = d["quantization"]
    params = dict(thaw(quant["calibration"]))
    # The statistics an algo family collects differ (AWQ: per-group search input; SQ: channel max; FP8/KV: amax)
    params["statistics"] = statistics_families(quant["algo"], quant["kv_cache"])
    params.update(_pick(quant, *ALGORITHMS[quant["algo"]].calibration_params))  # AWQ's search uses group_size
    if quant.get("awq_search") is False:  # only when off, so the keys of searching recipes stay as they were
        params["awq_search"] = False
    if ALGORITHMS[quant["algo"]].family == SMOOTHQUANT and is_auto(quant["smoothquant_alpha"]):
        # α is searched on the activations: the search's settings (and the algo it measures) are calibration's
        params["smoothquant_search"] = AlphaSearch(quant["algo"]).params()
    params["trust_remote_code"] = d["source"]["trust_remote_code"]  # the tokenizer may be the model's code
    # the tokenizer turns the calibration texts into the tokens the statistics come from
    return StageUse(("source", "calibration-data", "tokenizer"), params)


def _quantize(d: Recipe) -> StageUse | None:
    if not (_quantized(d) and TRTLLM_CHECKPOINT in output_targets(d)):
        return None
    fields = ("algo", "kv_cache", "group_size", "smoothquant_alpha", "exclude_modules")
    return StageUse(_quantizing_inputs(d), _pick(d["quantization"], *fields))


def target_release(d: Recipe) -> str:
    """The TensorRT-LLM release config.json and trtllm-build's argv are for: the recipe's, else the
    newest recorded (a build with trtllm-build installed puts its release here: execute.prepare)."""
    return d.get(RELEASE_FIELD) or newest().name


def _shard(d: Recipe) -> StageUse | None:
    if TRTLLM_CHECKPOINT not in output_targets(d):
        return None
    params = {**thaw(d["mapping"]), RELEASE_FIELD: target_release(d)}
    return StageUse(("quantize" if _quantized(d) else "convert", "source"), params)


def _export_hf(target: str) -> Callable[[Recipe], StageUse | None]:
    """An HF target quantizes for its own consumers from the shared convert + calibrate outputs."""
    def use(d: Recipe) -> StageUse | None:
        if target not in output_targets(d):
            return None
        quant = d["quantization"]
        fields = ("algo", "kv_cache", *ALGORITHMS[quant["algo"]].params, "exclude_modules")
        return StageUse(_quantizing_inputs(d), _pick(quant, *fields))
    return use


def _verifies(d: Recipe) -> bool:
    return "verify" in d and d["verify"]["enabled"]


def _verify(d: Recipe) -> StageUse | None:
    if not _verifies(d):
        return None
    # every checkpoint the recipe writes: the rank files, then each HF export (VERIFIED_STAGES order)
    checked = tuple(name for name in VERIFIED_STAGES if STAGES[name].uses(d) is not None)
    # prompts and the perplexity dataset are tokenized with the source's tokenizer files, which the
    # "source" input does not cover; the dataset's files enter as "verify-data"
    dataset = "perplexity" in d["verify"]
    inputs = checked + ("source",) + (("verify-data",) if dataset else ())
    inputs += ("tokenizer",) if d["verify"]["prompts"] or dataset else ()
    params = {**_pick(d["verify"], "prompts", "token_ids", "tolerances", "perplexity"),
              **_pick(d["source"], "trust_remote_code")}
    return StageUse(inputs, params)


def _build_engine(d: Recipe) -> StageUse | None:
    if "engine" not in d or TRTLLM_CHECKPOINT not in output_targets(d):
        return None
    # the engine waits for verify, whose key it does not include
    params = {**thaw(d["engine"]), RELEASE_FIELD: target_release(d)}
    return StageUse(("shard",), params, after=("verify",) if _verifies(d) else ())


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int  # enters the stage's key: bump it whenever its code changes what it writes
    uses: Callable[[Recipe], StageUse | None]  # its inputs and params for a recipe; None: the recipe has no use
    run: str  # "module:function" filling the entry: f(job: StageJob)
    memory: Callable[["ModelConfig", int], int]  # peak bytes, roughly (model, workers), for --max-memory
    publishes: str | None = None  # the folder of the output directory its entry is published as
    target: str | None = None  # the output target (output.targets) it writes, as verify names it
    until_alias: str | None = None  # another name `build --until` accepts for it


# In this order the plan lists the stages and verify checks the targets: the first one's report is
# <output>/verify/verify.*, the others' <output>/verify/<target>/verify.*.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("convert", 2, _convert, "recipe_runner.stages.convert:run_convert", lambda m, w: GiB // 2),
    StageSpec("calibrate", 2, _calibrate, "recipe_runner.stages.calibrate:run_calibrate",
              lambda m, w: _layer(m) + 2 * GiB),
    StageSpec("quantize", 1, _quantize, "recipe_runner.stages.quantize:run_quantize",
              lambda m, w: _layer(m) + 2 * GiB),
    StageSpec("shard", 1, _shard, "recipe_runner.stages.shard:run_shard", lambda m, w: w * (2 * _largest(m) + GiB),
              publishes="checkpoint", target=TRTLLM_CHECKPOINT, until_alias="checkpoint"),
    StageSpec("export-hf-modelopt", 3, _export_hf(HF_MODELOPT), "recipe_runner.stages.export_hf:run_export_hf",
              lambda m, w: 2 * _largest(m) + GiB, publishes="hf-modelopt", target=HF_MODELOPT),
    StageSpec("export-hf-compressed-tensors", 3, _export_hf(HF_COMPRESSED_TENSORS),
              "recipe_runner.stages.export_hf:run_export_hf", lambda m, w: 2 * _largest(m) + GiB,
              publishes="hf-compressed-tensors", target=HF_COMPRESSED_TENSORS),
    StageSpec("verify", 7, _verify, "recipe_runner.stages.verify:run_verify",
              lambda m, w: _layer(m) + _largest(m) + GiB, publishes="verify"),
    # trtllm-build's memory is unknown here, so it runs alone under --max-memory
    StageSpec("build-engine", 2, _build_engine, "recipe_runner.stages.engine:run_engine", lambda m, w: 1 << 62,
              publishes="engine", until_alias="engine"),
)}

DEVICE_STAGES = ("calibrate", "verify")  # the stages that compute on --device (recipe_runner/devices.py)
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
    progress: WorkProgress = NO_PROGRESS  # where a long computation reports its count; never in the bytes
    devices: tuple[str, ...] = ("cpu",)  # calibrate, verify: where they compute ("cuda:0", ...); the kind is in params

    @staticmethod
    def frozen_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
        """`params` as the key hashes them (through JSON), deeply read-only."""
        return freeze(json.loads(json.dumps(params, sort_keys=True)))


def stage_executor(name: str) -> Callable[[StageJob], None]:
    """The function that fills stage `name`'s cache entry (imported now)."""
    module, function = STAGES[name].run.split(":")
    return getattr(importlib.import_module(module), function)
