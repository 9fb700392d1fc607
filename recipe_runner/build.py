"""Execute a plan: run its stages in order and publish the artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from recipe_runner.errors import UserError
from recipe_runner.plan import Plan
from recipe_runner.sources import require_source

# What a user can do about each stage this release cannot run yet.
_WORKAROUND = {
    "calibrate": "use quantization.algo none (or w8a16/w4a16) with kv_cache none for now",
    "quantize": "use quantization.algo none with kv_cache none for now",
    "build-engine": "stop at the checkpoint with `--until checkpoint` and run trtllm-build yourself",
    "verify": "skip it with `--no-verify`",
}
_REASON_FIELD = {"calibrate": "quantization", "quantize": "quantization.algo", "build-engine": "engine", "verify": "verify"}


def refuse_unimplemented(plan: Plan) -> None:
    """Fail before any work when the plan needs a stage this release lacks."""
    missing = [s for s in plan.stages if not s.implemented]
    if not missing:
        return
    recipe = plan.recipe
    lines = [f"{recipe.path}: this recipe needs stages that recipe-runner cannot run yet:"]
    for stage in missing:
        field = _REASON_FIELD[stage.name]
        lines.append(f"  - {stage.name} (required by {field} at {recipe.location(field)}): {_WORKAROUND[stage.name]}")
    raise UserError("\n".join(lines))


def run_build(plan: Plan, *, workers: int | None, echo: Callable[[str], None] = print) -> Path:
    """Run every stage of `plan`; returns the published output directory."""
    refuse_unimplemented(plan)
    from recipe_runner.api import convert_with_recipe_settings

    recipe = plan.recipe
    source_dir = require_source(recipe)
    out_dir = recipe.resolve_path("output.dir")
    checkpoint = out_dir / "checkpoint"
    echo(f"[convert+shard] {source_dir} -> {checkpoint}")
    convert_with_recipe_settings(recipe, source_dir, checkpoint, workers=workers or recipe.data["workers"])
    return out_dir
