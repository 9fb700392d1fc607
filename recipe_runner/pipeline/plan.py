"""Recipe → Plan: the ordered stages `recipe build` runs, with the exact recipe
fields each one depends on. `recipe plan` prints this very object."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from recipe_runner.errors import Problem, RecipeError, UserError
from recipe_runner.recipe import Recipe
from recipe_runner.recipe.model import thaw
from recipe_runner.quant.algorithms import ALGORITHMS, needs_calibration, quantizes, statistics_families
from recipe_runner.hfexport.targets import (EXPORT_STAGES, HF_TARGETS, TRTLLM_CHECKPOINT, output_targets,
                                           target_notes)
from recipe_runner.hf.sources import SourceLocation, locate_source
# `build --until` takes a stage name or an alias (`checkpoint` = everything up to the rank files)
from recipe_runner.stages.registry import UNTIL_ALIASES, VERIFIED_STAGES



@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]  # upstream stages, or "source" / "calibration-data" / "tokenizer"
    params: Mapping[str, Any]  # exactly the recipe fields this stage's result depends on
    after: tuple[str, ...] = ()  # stages that must succeed first without entering the key

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": list(self.inputs), "after": list(self.after),
                "params": thaw(self.params)}


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    source: SourceLocation
    stages: tuple[Stage, ...]
    model_checked: bool  # the source config.json was read and the model-dependent rules ran
    notes: tuple[str, ...] = field(default=())

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_dict(self) -> dict:
        return {
            "recipe": str(self.recipe.path),
            "name": self.recipe.name,
            "recipe_sha256": self.recipe.canonical_hash(),
            "source": {"requested": self.source.description,
                       "directory": str(self.source.directory) if self.source.directory else None,
                       "missing_reason": self.source.missing_reason or None},
            "model_checked": self.model_checked,
            "stages": [s.to_dict() for s in self.stages],
            "notes": list(self.notes),
        }


def _pick(section: Mapping[str, Any] | None, *keys: str) -> dict:
    section = section or {}
    return {k: thaw(section[k]) for k in keys if k in section}


def recipe_stages(recipe: Recipe) -> list[Stage]:
    """Every stage the recipe needs, in order, before --until/--no-verify cuts."""
    d = recipe.data
    quant = d["quantization"]
    algorithm = ALGORITHMS[quant["algo"]]
    calibrated = needs_calibration(quant["algo"], quant["kv_cache"])
    quantized = quantizes(quant["algo"], quant["kv_cache"])
    specs: list[tuple[str, tuple[str, ...], dict]] = [
        ("convert", ("source",), _pick(d["source"], "dtype", "trust_remote_code")),
    ]
    if calibrated:
        calib = dict(thaw(quant["calibration"]))
        # The statistics an algo family collects differ (AWQ: per-group search input; SQ: channel max; FP8/KV: amax)
        calib["statistics"] = statistics_families(quant["algo"], quant["kv_cache"])
        calib.update(_pick(quant, *algorithm.calibration_params))  # AWQ's scale search quantizes with group_size
        calib["trust_remote_code"] = d["source"]["trust_remote_code"]  # the tokenizer may be the model's code
        # the tokenizer turns the calibration texts into the tokens the statistics come from
        specs.append(("calibrate", ("source", "calibration-data", "tokenizer"), calib))
    targets = output_targets(d)
    # the stages that quantize read the source weights, beside the model facts and statistics
    upstream = ("convert", "calibrate", "source") if calibrated else ("convert", "source")
    legacy = TRTLLM_CHECKPOINT in targets
    if quantized and legacy:
        specs.append(("quantize", upstream,
                      _pick(quant, "algo", "kv_cache", "group_size", "smoothquant_alpha", "exclude_modules")))
    # HF targets quantize for their own consumers from the shared convert + calibrate outputs
    for target in (t for t in HF_TARGETS if t in targets):
        specs.append((EXPORT_STAGES[target], upstream,
                      _pick(quant, "algo", "kv_cache", *algorithm.params, "exclude_modules")))
    if legacy:
        specs.append(("shard", ("quantize" if quantized else "convert", "source"), thaw(d["mapping"])))
    verified = "verify" in d and d["verify"]["enabled"]
    if verified:
        # every checkpoint the recipe writes: the rank files, then each HF export (see VERIFIED_STAGES)
        checked = tuple(s for s in VERIFIED_STAGES if s in {name for name, _, _ in specs})
        # prompts are tokenized with the source's tokenizer files, which the "source" input does not cover
        verify_inputs = checked + (("source", "tokenizer") if d["verify"]["prompts"] else ("source",))
        specs.append(("verify", verify_inputs, {**_pick(d["verify"], "prompts", "token_ids", "tolerances"),
                                                **_pick(d["source"], "trust_remote_code")}))
    if "engine" in d and legacy:
        specs.append(("build-engine", ("shard",), thaw(d["engine"])))
    stages = [Stage(name, inputs, params) for name, inputs, params in specs]
    if verified and "engine" in d:  # the engine waits for verify, whose key it does not include
        stages[-1] = dataclasses.replace(stages[-1], after=("verify",))
    return stages


def make_plan(recipe: Recipe, *, until: str | None = None, skip_verify: bool = False) -> Plan:
    """The stages to run for `recipe`; raises RecipeError when the source model contradicts it."""
    stages = recipe_stages(recipe)
    if skip_verify:
        stages = [s for s in stages if s.name != "verify"]
    if until is not None:
        stages = _cut(stages, until)
    names = {s.name for s in stages}
    stages = [dataclasses.replace(s, after=tuple(a for a in s.after if a in names)) for s in stages]
    source = locate_source(recipe)
    model_checked = False
    notes: list[str] = list(target_notes(recipe.data))
    if source.directory is not None and (source.directory / "config.json").is_file():
        check_against_model(recipe, source)
        model_checked = True
    else:
        notes.append(f"source model not available here ({source.missing_reason or 'no config.json'}); "
                     "the checks that need its config.json run at build time")
    return Plan(recipe, source, tuple(stages), model_checked, tuple(notes))


def _cut(stages: list[Stage], until: str) -> list[Stage]:
    names = [s.name for s in stages]
    # a checkpoint is finished once it is verified (when the recipe verifies it)
    target = "verify" if until == "checkpoint" and "verify" in names else UNTIL_ALIASES.get(until, until)
    if target not in names:
        choices = ", ".join([*names, *(a for a, t in UNTIL_ALIASES.items() if t in names)])
        raise UserError(f"--until {until}: this recipe has no such stage (its stages: {choices})")
    return stages[: names.index(target) + 1]


def refuse_remote_code(recipe: Recipe, source: SourceLocation) -> None:
    """A model whose JSON files ask for custom Python code (auto_map in config.json,
    tokenizer_config.json, ...) is built only when the recipe allows that code to run."""
    from recipe_runner.hf.remote_code import TRUST_FIELD, auto_maps, describe

    found = auto_maps(source.directory)
    if found and not recipe.data["source"]["trust_remote_code"]:
        raise RecipeError([Problem(recipe.location("source"), TRUST_FIELD,
                                   f"{describe(found)}; review that code, then set {TRUST_FIELD}: true "
                                   "to allow it")])


def check_against_model(recipe: Recipe, source: SourceLocation) -> None:
    """The rules that need the source's config.json, reported at the recipe field they concern."""
    from recipe_runner.checks import model_findings
    from recipe_runner.hf.config import read_model_config
    from recipe_runner.hf.weights import check_source_weights

    refuse_remote_code(recipe, source)
    model = read_model_config(source.directory)
    findings = model_findings(model, recipe.data, source.directory)
    if findings:
        raise RecipeError([Problem(recipe.location(f), f, m) for f, m in findings])
    # then the weights themselves (recipe findings first: they only need config.json): safetensors
    # headers, the index entries, the tensors and layer count against config.json
    check_source_weights(source.directory, model)
