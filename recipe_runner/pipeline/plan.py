"""Recipe → Plan: the ordered stages `recipe build` runs, with the exact recipe
fields each one depends on. `recipe plan` prints this very object."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from recipe_runner.checks import model_findings
from recipe_runner.devices import CPU_CHOICE, DeviceChoice
from recipe_runner.errors import Problem, RecipeError, UserError
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.remote_code import TRUST_FIELD, auto_maps, describe
from recipe_runner.hf.weights import check_source_weights
from recipe_runner.recipe import Recipe
from recipe_runner.recipe.model import thaw
from recipe_runner.hfexport.targets import target_notes
from recipe_runner.hf.sources import SourceLocation, locate_source, source_field
# `build --until` takes a stage name or an alias (`checkpoint` = everything up to the rank files)
from recipe_runner.stages.registry import DEVICE_STAGES, STAGES, UNTIL_ALIASES



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
    problems: tuple[Problem, ...] = ()  # what those rules found, kept (make_plan(collect=True)) for the preflight
    device: DeviceChoice = CPU_CHOICE  # where calibrate and verify compute (its kind is in their keys unless cpu)

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
            **({} if self.device.is_cpu else {"device": {"kind": self.device.kind, "devices": list(self.device.names)}}),
        }


def recipe_stages(recipe: Recipe, device: DeviceChoice = CPU_CHOICE) -> list[Stage]:
    """Every stage the recipe uses, in registry order, before --until/--no-verify cuts. The stages that
    compute on `device` get its kind in their params unless it is cpu (CPU keys stay as they were)."""
    uses = ((name, spec.uses(recipe.data)) for name, spec in STAGES.items())
    return [Stage(name, use.inputs, {**use.params, **(device.key_param() if name in DEVICE_STAGES else {})},
                  use.after) for name, use in uses if use is not None]


def make_plan(recipe: Recipe, *, until: str | None = None, skip_verify: bool = False, collect: bool = False,
              device: DeviceChoice = CPU_CHOICE) -> Plan:
    """The stages to run for `recipe` on `device` (recipe_runner/devices.py parse_device); raises RecipeError
    when the source model contradicts it (with `collect`, keeps those problems in the plan instead, for
    pipeline.preflight to report with the rest)."""
    stages = recipe_stages(recipe, device)
    if skip_verify:
        stages = [s for s in stages if s.name != "verify"]
    if until is not None:
        stages = _cut(stages, until)
    names = {s.name for s in stages}
    stages = [dataclasses.replace(s, after=tuple(a for a in s.after if a in names)) for s in stages]
    source = locate_source(recipe)
    model_checked = False
    notes: list[str] = list(target_notes(recipe.data))
    problems: list[Problem] = []
    if source.directory is not None and (source.directory / "config.json").is_file():
        try:
            check_against_model(recipe, source)
        except UserError as exc:
            if not collect:
                raise
            problems = as_problems(exc, recipe, source_field(recipe))
        model_checked = True
    else:
        notes.append(f"source model not available here ({source.missing_reason or 'no config.json'}); "
                     "the checks that need its config.json run at build time")
    return Plan(recipe, source, tuple(stages), model_checked, tuple(notes), tuple(problems), device)


def as_problems(error: UserError, recipe: Recipe, *fields: str) -> list[Problem]:
    """A refusal as located problems: a RecipeError's own; another error's message located at the
    first of `fields` whose location (or name) it starts with, else at the first field. The latter
    print as the error did (`error: ...`), with the location where the message lacked it."""
    if isinstance(error, RecipeError):
        return list(error.problems)
    message = str(error)
    for name in fields:
        where = recipe.location(name)
        for prefix in (f"{where}: {name}: ", f"{where}: ", f"{name}: "):
            if message.startswith(prefix):
                text = message if message.startswith(str(where)) else f"{where}: {message}"
                return [Problem(where, name, message[len(prefix):], f"error: {text}")]
    return [Problem(recipe.location(fields[0]), fields[0], message, f"error: {message}")]


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
    found = auto_maps(source.directory)
    if found and not recipe.data["source"]["trust_remote_code"]:
        raise RecipeError([Problem(recipe.location("source"), TRUST_FIELD,
                                   f"{describe(found)}; review that code, then set {TRUST_FIELD}: true "
                                   "to allow it")])


def check_against_model(recipe: Recipe, source: SourceLocation) -> None:
    """The rules that need the source's config.json, reported at the recipe field they concern."""
    refuse_remote_code(recipe, source)
    model = read_model_config(source.directory)
    findings = model_findings(model, recipe.data, source.directory)
    if findings:
        raise RecipeError([Problem(recipe.location(f), f, m) for f, m in findings])
    # then the weights themselves (recipe findings first: they only need config.json): safetensors
    # headers, the index entries, the tensors and layer count against config.json
    check_source_weights(source.directory, model)
