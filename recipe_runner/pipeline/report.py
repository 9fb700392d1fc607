"""Human-readable and JSON views of plans (what `recipe plan` prints)."""
from __future__ import annotations

import json
import textwrap
from typing import Any

from recipe_runner.errors import Problem
from recipe_runner.hf.config import read_model_config
from recipe_runner.pipeline.progress import format_size
from recipe_runner.pipeline.plan import Plan
from recipe_runner.pipeline.resolve import ResolvedPlan
from recipe_runner.stages.registry import calibration_device_bytes


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "\n" not in value else json.dumps(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def format_params(params: dict) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in params.items()) or "-"


def _status(resolved: ResolvedPlan | None, name: str) -> str:
    if resolved is None:
        return "key unknown until the source is available"
    status = resolved.status(name)
    if status.cached:
        return f"key {status.key.short}  cached"
    return f"key {status.key.short}  missing: {'; '.join(status.reasons)}"


def format_plan(plan: Plan, resolved: ResolvedPlan | None = None) -> str:
    recipe = plan.recipe
    lines = [
        f"plan for {recipe.path}",
        f"  recipe  {recipe.name} (sha256 {recipe.canonical_hash()[:12]})",
        f"  source  {plan.source.description}"
        + ("" if plan.source.directory else f"  [not available: {plan.source.missing_reason}]"),
        f"  output  {recipe.resolve_path('output.dir')}",
        f"  device  {_device_line(plan, resolved)}",
        "",
    ]
    width = max(len(s.name) for s in plan.stages)
    indent = " " * (width + 7)
    for index, stage in enumerate(plan.stages, 1):
        after = f"  (after {', '.join(stage.after)})" if stage.after else ""
        lines.append(f"  {index}. {stage.name:<{width}}  <- {', '.join(stage.inputs)}{after}")
        lines.append(f"{indent}[{_status(resolved, stage.name)}]")
        wrapped = textwrap.wrap(format_params(dict(stage.params)), width=96, break_long_words=False,
                                break_on_hyphens=False)
        lines.extend(f"{indent}{line}" for line in wrapped)
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _device_line(plan: Plan, resolved: ResolvedPlan | None) -> str:
    """Where calibrate and verify compute and, for calibrate, its peak on each device (model known)."""
    device = plan.device
    line = device.kind + ("" if device.is_cpu else f" ({', '.join(device.names)})")
    calibrate = plan.stage("calibrate")
    if calibrate is not None and resolved is not None:
        peak = calibration_device_bytes(read_model_config(resolved.source_dir), calibrate.params, len(device.names))
        search = ", + the alpha candidates' activations" if "smoothquant_search" in calibrate.params else ""
        line += (f"; calibrate peaks at ~{format_size(peak)} per device (one decoder layer in float32 + "
                 f"the calibration activations{search})")
    return line


def plan_json(plan: Plan, resolved: ResolvedPlan | None = None) -> dict:
    data = plan.to_dict()
    if resolved is not None:
        for stage in data["stages"]:
            status = resolved.status(stage["name"])
            stage.update(key=status.key.digest, cached=status.cached, reasons=list(status.reasons))
    return data


def shared_stages(resolved: list[ResolvedPlan | None]) -> list[dict]:
    """Stages that several of the plans need (equal keys): each is built once."""
    users: dict[str, dict] = {}
    for plan in (r for r in resolved if r is not None):
        for status in plan.statuses:
            entry = users.setdefault(status.key.digest, {"stage": status.stage.name, "key": status.key.digest,
                                                         "cached": status.cached, "recipes": []})
            entry["recipes"].append(plan.plan.recipe.name)
    return [u for u in users.values() if len(u["recipes"]) > 1]


def format_shared(resolved: list[ResolvedPlan | None]) -> str:
    shared = shared_stages(resolved)
    unknown = sum(r is None for r in resolved)
    lines = ["stages shared between these recipes (each built once):"]
    lines += [f"  {s['stage']:<12} {s['key'][:12]}  {'cached' if s['cached'] else 'to build'}  used by "
              f"{', '.join(s['recipes'])}" for s in shared] or ["  none"]
    if unknown:
        lines.append(f"  ({unknown} recipe(s) without their source here are not compared)")
    return "\n".join(lines)


def format_dry_run(resolved: list[ResolvedPlan]) -> str:
    """`build --dry-run`: each plan with its keys, the shared stages, how many stages would run."""
    text = "\n\n".join(format_plan(r.plan, r) for r in resolved)
    if len(resolved) > 1:
        text += "\n\n" + format_shared(resolved)
    keys = {s.key.digest: s.cached for r in resolved for s in r.statuses}
    run = sum(not cached for cached in keys.values())
    shared = f" ({len(shared_stages(resolved))} shared)" if len(resolved) > 1 else ""
    return f"{text}\ndry run: {run} stage(s) would run, {len(keys) - run} cached{shared}; nothing was built"


# ---- machine-readable documents (`--format json`): one versioned shape each, any number of recipes ----

VALIDATE_FORMAT = "recipe-runner/validate/1"
PLAN_FORMAT = "recipe-runner/plan/1"
BUILD_FORMAT = "recipe-runner/build/2"  # 2: stages carry peak_rss_bytes, outputs build_record


def problems_json(problems: list) -> list[dict]:
    """Problems (located or not) as {file, line, column, field, message}, sorted by position."""
    return [p.to_dict() if isinstance(p, Problem) else
            {"file": None, "line": None, "column": None, "field": "", "message": str(p)} for p in problems]


def validate_document(files: list[dict]) -> dict:
    """`files`: one {file, ok, recipes: [{name, sha256}], errors: [problem]} per recipe file."""
    return {"format": VALIDATE_FORMAT, "ok": all(f["ok"] for f in files), "files": files}


def plan_document(plans: list[Plan], resolved: list[ResolvedPlan | None], *, checked: bool = False,
                  problems: list | None = None) -> dict:
    return {"format": PLAN_FORMAT, "checked": checked, "ok": not problems,
            "problems": problems_json(problems or []),
            "recipes": [plan_json(p, r) for p, r in zip(plans, resolved)], "shared": shared_stages(resolved)}


def build_document(recipes: list[dict], exit_code: int, problems: list | None = None) -> dict:
    """`recipes`: summary.build_summaries (or not_run_summaries when the preflight refused the build)."""
    return {"format": BUILD_FORMAT, "ok": exit_code == 0, "exit_code": exit_code,
            "problems": problems_json(problems or []), "recipes": recipes}
