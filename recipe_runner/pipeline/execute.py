"""The steps of a build that the scheduler drives: refuse what cannot run or publish (prepare), build
one stage's cache entry (execute_stage), publish a finished plan as one generation with its lock
file (finish). recipe_runner.pipeline.build runs one plan through them."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Callable

from recipe_runner.calibration.dataset import CALIBRATION, PERPLEXITY, locate_dataset
from recipe_runner.devices import CPU
from recipe_runner.hf.files import tokenizer_problem
from recipe_runner.hf.sources import source_problem
from recipe_runner.checks.release import release_findings
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.entry import Entry
from recipe_runner.errors import Problem, RecipeError, StageFailed, UserError
from recipe_runner.store.lock import BUILD_RECORD_NAME, LOCK_NAME, LockFile, compare_inputs, compare_outputs, tool_versions
from recipe_runner.pipeline.plan import Plan, as_problems, make_plan
from recipe_runner.recipe import Recipe
from recipe_runner.io.work_progress import PROGRESS_NAME, WorkProgress
from recipe_runner.pipeline.progress import format_size
from recipe_runner.pipeline.usage import measure
from recipe_runner.store.ownership import check_cache_location, check_output_location
from recipe_runner.store.publish import Generation, OutputDir
from recipe_runner.pipeline.resolve import DATASET_INPUTS, ResolvedPlan, resolve, write_record
from recipe_runner.stages.registry import DEVICE_STAGES, PUBLISHED, StageJob, stage_executor
from recipe_runner.trtllm.releases import FIELD, recorded_names, release_of_version, releases
from recipe_runner.trtllm.toolchain import Toolchain, require_toolchain
from recipe_runner.verify.report import JSON_NAME, MARKDOWN_NAME, name_recipe

Echo = Callable[[str], None]



@dataclass
class BuildResult:
    output_dir: Path
    lock_path: Path
    trace: list[dict] = field(default_factory=list)  # one {"stage", "key", "action", "seconds", "peak_rss_bytes"} per stage


def prepare(plans: list[Plan], store: CacheStore, *, rehash: bool, force: bool = False,
            echo: Echo) -> list[ResolvedPlan]:
    """Refuse what cannot run or publish (every problem at once, see preflight) and key every stage,
    before any stage runs."""
    checked = preflight(plans, store, force=force)
    if checked.problems:
        raise RecipeError(checked.problems)
    if checked.toolchain is not None:
        echo(f"[build-engine] using {checked.toolchain.describe()}")
    return [resolve(plan, store, rehash=rehash, toolchain=checked.toolchain) for plan in checked.plans]


@dataclass(frozen=True)
class Preflight:
    plans: list[Plan]  # those that build an engine target the installed trtllm-build's release
    toolchain: Toolchain | None  # when a plan builds an engine and trtllm-build is here
    problems: list[Problem]  # sorted by position; empty when the build can start


DATASET_ROLES = {"calibration-data": CALIBRATION, "verify-data": PERPLEXITY}  # by stage input

# Stages that tokenize with the source's tokenizer files: the field a missing tokenizer is reported at.
TOKENIZER_USERS = {"calibrate": ("quantization.calibration", "calibration needs to tokenize its dataset"),
                   "verify": ("verify.prompts", "verify needs to tokenize verify.prompts (or give verify.token_ids)")}


def preflight(plans: list[Plan], store: CacheStore, *, force: bool = False) -> Preflight:
    """Everything that can be known before running, all together: the plans' model problems
    (make_plan(collect=True)), a missing source model or config.json, a missing calibration file or
    dataset, a missing tokenizer, trtllm-build missing or of another release, output directory conflicts."""
    problems = [p for plan in plans for p in plan.problems]
    for plan in plans:
        recipe, directory = plan.recipe, plan.source.directory
        problems += filter(None, [source_problem(recipe, plan.source)])
        inputs = {i for s in plan.stages for i in s.inputs}
        for role in (DATASET_ROLES[name] for name in DATASET_INPUTS if name in inputs):
            field = role.field("dataset")
            try:
                locate_dataset(recipe.get(field), recipe.resolve_path(field), recipe.get(role.field("split")),
                               recipe.get(role.field("revision")), role)
            except UserError as exc:
                problems += as_problems(exc, recipe, field, role.field("split"), role.field("revision"))
        for stage in (s for s in plan.stages if "tokenizer" in s.inputs and directory is not None):
            field, needed_for = TOKENIZER_USERS[stage.name]
            if stage.name == "verify" and not recipe.get("verify.prompts"):
                field, needed_for = "verify.perplexity", "verify needs to tokenize verify.perplexity's dataset"
            message = tokenizer_problem(directory, needed_for)
            problems += [Problem(recipe.location(field), field, message)] if message else []
    problems += output_problems(plans, store, force)
    toolchain, engines = None, [plan for plan in plans if plan.stage("build-engine") is not None]
    if engines:
        try:
            toolchain = require_toolchain()
        except UserError as exc:
            problems += [Problem(plan.recipe.location("engine"), "engine", str(exc)) for plan in engines]
    if toolchain is not None:
        checked = []
        for plan in plans:
            try:
                checked.append(for_installed_release(plan, toolchain))
            except UserError as exc:
                problems += as_problems(exc, plan.recipe, FIELD, "engine")
                checked.append(plan)
        plans = checked
    unique = {str(p): p for p in problems}  # one model's problem may be found twice (tokenizer)
    return Preflight(plans, toolchain, sorted(unique.values(), key=lambda p: p.location.sort_key()))


def for_installed_release(plan: Plan, toolchain: Toolchain) -> Plan:
    """A plan that builds an engine targets the installed trtllm-build's TensorRT-LLM release: a recipe
    naming another release is refused; one naming none takes the installed one into its keys."""
    recipe = plan.recipe
    if plan.stage("build-engine") is None:
        return plan
    installed, wanted = release_of_version(toolchain.version), recipe.data.get(FIELD)
    if wanted is not None:
        if wanted != installed:
            raise UserError(f"{recipe.location(FIELD)}: {FIELD}: the recipe targets TensorRT-LLM {wanted}, but the "
                            f"installed trtllm-build is TensorRT-LLM {toolchain.version}; install {wanted}, or set "
                            f'{FIELD}: "{installed}" after reviewing what changes')
        return plan
    if installed not in releases():
        raise UserError(f"{recipe.location('engine')}: engine: the installed trtllm-build is TensorRT-LLM "
                        f"{toolchain.version}, a release recipe-runner has no recorded facts for (recorded: "
                        f"{recorded_names()}); install a recorded release and set {FIELD}, or record this one "
                        "with scripts/trtllm_release_facts.py")
    findings = release_findings(recipe.data, installed)
    if findings:
        raise RecipeError([Problem(recipe.location(f), f, m) for f, m in findings])
    stages = tuple(dataclasses.replace(s, params={**s.params, FIELD: installed}) if FIELD in s.params else s
                   for s in plan.stages)
    return dataclasses.replace(plan, stages=stages)


def output_problems(plans: list[Plan], store: CacheStore, force: bool) -> list[Problem]:
    """Each plan publishes into an output directory of its own that it may write (see
    publish.OutputDir), outside its source model and the cache."""
    seen: dict[str, str] = {}
    problems = []
    for plan in plans:
        output = output_dir_of(plan.recipe)
        real = os.path.realpath(output.path)
        try:
            if real in seen:
                raise UserError(f"{output.where}: {output.path} is also the output of recipe {seen[real]!r} in "
                                "this build; give each recipe its own output.dir")
            seen[real] = plan.recipe.name
            check_cache_location(store.root, plan.source.directory)
            check_output_location(output.path, output.where, plan.source.directory, store.root)
            names = {PUBLISHED[s.name] for s in plan.stages if s.name in PUBLISHED} | {LOCK_NAME}
            output.check(names, force)
        except UserError as exc:
            problems += as_problems(exc, plan.recipe, "output.dir")
    return problems


def output_dir_of(recipe: Recipe, echo: Echo | None = None) -> OutputDir:
    """The recipe's output directory, located at its output.dir field for messages."""
    return OutputDir(recipe.resolve_path("output.dir"), f"{recipe.location('output.dir')}: output.dir", warn=echo)


def execute_stage(resolved: ResolvedPlan, name: str, entries: dict[str, Entry], store: CacheStore,
                  workers: int, echo: Echo, whose: str = "") -> dict:
    """Build one stage's cache entry (or find it built); `entries` must hold its inputs' entries.
    Returns its trace record (with its time and peak memory) and adds the entry to `entries`.
    `whose` names the recipes the stage is for in log lines (builds of several recipes)."""
    status = resolved.status(name)
    key = status.key
    tag = f"[{name}{' ' + whose if whose else ''}]"
    ran: list[bool] = []

    def produce(data_dir: Path) -> None:
        # Announced here, not before store.build: a concurrent build may finish this key first.
        echo(f"{tag} running ({key.short}): {'; '.join(status.reasons) or 'forced'}")
        ran.append(True)
        stage_executor(name)(stage_job(resolved, name, entries, data_dir, workers))

    def waiting(lock_file: Path) -> None:
        echo(f"{tag} waiting: another build (or `recipe cache gc`) holds this stage's lock ({key.short}, "
             f"{lock_file}); this build goes on when it finishes")

    recipe = resolved.plan.recipe
    with measure() as usage:
        try:
            entries[name] = store.build(key.digest, name, produce, recipe=recipe.name, on_wait=waiting)
        except StageFailed as exc:
            if exc.field is None:
                raise
            raise StageFailed(f"{exc}\n{recipe.location(exc.field)}: {exc.field} is here") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # the environment, not a bug: one line naming where, what to do (the entry was not made)
            raise UserError(f"[{name}] cannot write the cache entry in {store.root}: {exc.strerror} "
                            f"({exc.filename or store.root}); free space (`recipe cache gc`), fix its permissions "
                            "or choose another --cache-dir") from None
    record = {"stage": name, "key": key.digest, "action": "ran" if ran else "cached", **usage.record()}
    if ran:
        peak = f", peak RSS {format_size(usage.peak_rss_bytes)}" if usage.peak_rss_bytes else ""
        echo(f"{tag} ran in {usage.seconds:.1f} s{peak} ({key.short})")
    else:
        echo(f"{tag} cached ({key.short})")
    return record


def stage_job(resolved: ResolvedPlan, name: str, entries: dict[str, Entry], out_dir: Path, workers: int) -> StageJob:
    """What stage `name` runs from: its key's params and one path per input of its key, no more."""
    material = resolved.status(name).key.material
    inputs = {n: input_path(resolved, n, entries) for n in material["inputs"]}
    return StageJob(name, StageJob.frozen_params(material["params"]), MappingProxyType(inputs),
                    MappingProxyType(dict(material["inputs"])), out_dir, workers,
                    resolved.toolchain if name == "build-engine" else None,
                    # beside the payload (its cache temp dir), where the build's progress display reads it
                    WorkProgress(out_dir.parent / PROGRESS_NAME),
                    resolved.plan.device.names if name in DEVICE_STAGES else ("cpu",))


def input_path(resolved: ResolvedPlan, name: str, entries: dict[str, Entry]) -> Path:
    """Where a stage reads input `name`: the tokenizer files sit in the source model's directory."""
    if name in ("source", "tokenizer"):
        return resolved.source_dir
    if name in DATASET_INPUTS:  # a local file, or a dataset id the stage looks up in the HF cache
        return resolved.plan.recipe.resolve_path(f"{DATASET_INPUTS[name]}.dataset")
    return entries[name].path


def finish(resolved: ResolvedPlan, entries: dict[str, Entry], store: CacheStore, locked: LockFile | None,
           trace: list[dict], force: bool = False, echo: Echo = print) -> BuildResult:
    """Check a locked rebuild, publish the outputs and the lock file as one generation, remember
    this build."""
    recipe = resolved.plan.recipe
    reports = recipe_reports(resolved, entries)
    outputs = published_outputs(entries, reports)
    if locked is not None:
        differences = compare_outputs(locked.outputs, outputs)
        if differences:
            raise UserError("the rebuild is not bit-identical to the lock file:\n  " + "\n  ".join(differences))
    lock = make_lock(resolved, outputs)
    generation = Generation(trees={PUBLISHED[s]: entries[s].path for s in PUBLISHED if s in entries},
                            files={**reports, LOCK_NAME: lock.to_json().encode("utf-8"),
                                   BUILD_RECORD_NAME: build_record(resolved, lock, trace)})
    output = output_dir_of(recipe, echo)
    out_dir = output.path
    if output.is_current(generation):
        output.tidy(generation.names)
        echo(f"[publish] {out_dir} is up to date")
    else:
        for stage in PUBLISHED:
            problem = entries[stage].problem() if stage in entries else None
            if problem is not None:  # changed since the build read it: never publish it
                raise UserError(f"the cache entry of stage {stage} changed during the build ({problem}); "
                                "run the build again (it rebuilds the entry)")
        started = time.monotonic()
        stats = output.publish(generation, force)
        echo(f"[publish] {out_dir}: {stats.files} files, {format_size(stats.bytes)} copied "
             f"({stats.reflinked} as reflinks) in {time.monotonic() - started:.1f} s")
    write_record(store, resolved)
    return BuildResult(out_dir, out_dir / LOCK_NAME, trace)


BUILD_RECORD_FORMAT = "recipe-runner/build-record/1"


def build_record(resolved: ResolvedPlan, lock: LockFile, trace: list[dict]) -> bytes:
    """<output>/build.json: how the build that published this generation went (each stage ran or
    cached, its seconds and peak RSS, when, on which host). Unlike the lock it differs every run,
    so it is in no key, no lock and no golden file; an up-to-date output keeps the record of the
    build that published it."""
    record = {"format": BUILD_RECORD_FORMAT, "recipe": resolved.plan.recipe.name,
              "recipe_sha256": lock.recipe_sha256, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "host": platform.node(), "seconds": round(sum(t.get("seconds") or 0 for t in trace), 3),
              "stages": [{k: t[k] for k in ("stage", "key", "action", "seconds", "peak_rss_bytes") if k in t}
                         for t in trace]}
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def recipe_reports(resolved: ResolvedPlan, entries: dict[str, Entry]) -> dict[str, bytes]:
    """The verify reports as published: the cached ones (which name no recipe, so that recipes
    sharing the verify key share its entry) with this recipe's name and hash filled in."""
    if "verify" not in entries:
        return {}
    recipe, folder = resolved.plan.recipe, PUBLISHED["verify"]
    out = {}
    for rel in sorted(r for r in entries["verify"].files if r.rsplit("/", 1)[-1] == JSON_NAME):
        report, markdown = name_recipe((entries["verify"].path / rel).read_bytes(), recipe.name,
                                       recipe.canonical_hash())
        out[f"{folder}/{rel}"] = report
        out[f"{folder}/{rel.removesuffix(JSON_NAME)}{MARKDOWN_NAME}"] = markdown
    return out


def published_outputs(entries: dict[str, Entry], written: dict[str, bytes] | None = None) -> dict[str, dict]:
    """The output files as the lock lists them: the cache manifests' records (no re-read), and
    the files publishing writes itself."""
    outputs = {}
    for stage, folder in PUBLISHED.items():
        if stage in entries:
            outputs.update({f"{folder}/{rel}": dict(meta) for rel, meta in entries[stage].files.items()})
    for rel, data in (written or {}).items():
        outputs[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return dict(sorted(outputs.items()))


def make_lock(resolved: ResolvedPlan, outputs: dict) -> LockFile:
    recipe = resolved.plan.recipe
    return LockFile(
        recipe_name=recipe.name,
        recipe_path=str(recipe.path),
        recipe_sha256=recipe.canonical_hash(),
        tools={**tool_versions(), **_toolchain_versions(resolved)},
        stages=[{"name": s.stage.name, "key": s.key.digest,
                 **({"device": s.stage.params["device"]} if "device" in s.stage.params else {})}
                for s in resolved.statuses],
        outputs=outputs,
        **lock_inputs(resolved),
    )


def lock_inputs(resolved: ResolvedPlan) -> dict:
    """The inputs as the lock lists them: sources, tokenizer, calibration and verify's perplexity dataset
    (None where no stage reads them), each file's size and sha256, a dataset's id and the HF-cache
    snapshot used."""
    def listing(files) -> dict:
        return {n: d.to_dict() for n, d in files.items()}

    def dataset(found) -> dict | None:
        if found is None:
            return None
        return {"dataset": found.dataset, "files": listing(found.files),
                **({"revision": found.revision} if found.revision is not None else {})}

    return {"sources": listing(resolved.sources),
            "tokenizer": listing(resolved.tokenizer.files) if resolved.tokenizer is not None else None,
            "calibration": dataset(resolved.calibration), "perplexity": dataset(resolved.verify_data)}


def _toolchain_versions(resolved: ResolvedPlan) -> dict[str, str]:
    if resolved.toolchain is None:
        return {}
    material = resolved.toolchain.key_material()
    return {"tensorrt_llm": material["tensorrt_llm"], "gpus": "; ".join(material["gpus"])}


def lock_input_problems(resolved: ResolvedPlan, locked: LockFile) -> list[str]:
    """How the recipe and its input files here differ from what the lock records; [] when they match."""
    problems = []
    recipe = resolved.plan.recipe
    if recipe.canonical_hash() != locked.recipe_sha256:
        problems.append(f"recipe {recipe.path} (sha256 {recipe.canonical_hash()[:12]}) is not the locked "
                        f"recipe (sha256 {locked.recipe_sha256[:12]}); `recipe diff` shows what changed")
    return problems + compare_inputs(locked, **lock_inputs(resolved))


def check_lock_inputs(resolved: ResolvedPlan, locked: LockFile) -> None:
    """A locked rebuild needs the same recipe and the same input bytes (source, tokenizer, calibration
    files; the calibration snapshot) as the lock records."""
    problems = device_problems(resolved, locked) + lock_input_problems(resolved, locked)
    if problems:
        raise UserError("cannot rebuild from the lock file:\n  " + "\n  ".join(problems))


def device_problems(resolved: ResolvedPlan, locked: LockFile) -> list[str]:
    """A stage the lock ran on another kind of device than this build: its key (and bytes) cannot match."""
    here = {s.stage.name: s.stage.params.get("device", CPU) for s in resolved.statuses}
    problems = []
    for stage in (s for s in locked.stages if s["name"] in here):
        want, have = stage.get("device", CPU), here[stage["name"]]
        if want != have:
            remedy = f"--device {want.split('/')[0]}"  # cuda/<model> -> cuda; cpu -> cpu
            problems.append(f"{stage['name']}: the lock's key was made on {want}, this build runs on {have} "
                            f"(results differ between device kinds); build with {remedy} or re-lock")
    return problems


def recheck_inputs(recipe: Recipe, store: CacheStore) -> Callable[[LockFile], list[str]]:
    """For `verify_lock(..., inputs=)`: the recipe's inputs here, re-read (every byte) and compared with
    the lock's; the stages are those the lock names (so `--until` / `--no-verify` builds match)."""
    def problems(locked: LockFile) -> list[str]:
        names = {s["name"] for s in locked.stages}
        plan = make_plan(recipe)
        plan = dataclasses.replace(plan, stages=tuple(s for s in plan.stages if s.name in names))
        return lock_input_problems(resolve(plan, store, rehash=True), locked)

    return problems
