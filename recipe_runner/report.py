"""Human-readable text for plans (what `recipe plan` prints)."""
from __future__ import annotations

import json
import textwrap
from typing import Any

from recipe_runner.plan import Plan


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "\n" not in value else json.dumps(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def format_params(params: dict) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in params.items()) or "-"


def format_plan(plan: Plan) -> str:
    recipe = plan.recipe
    lines = [
        f"plan for {recipe.path}",
        f"  recipe  {recipe.name} (sha256 {recipe.canonical_hash()[:12]})",
        f"  source  {plan.source.description}"
        + ("" if plan.source.directory else f"  [not available: {plan.source.missing_reason}]"),
        f"  output  {recipe.resolve_path('output.dir')}",
        "",
    ]
    width = max(len(s.name) for s in plan.stages)
    for index, stage in enumerate(plan.stages, 1):
        status = "" if stage.implemented else "  [not available in this release]"
        lines.append(f"  {index}. {stage.name:<{width}}  <- {', '.join(stage.inputs)}{status}")
        wrapped = textwrap.wrap(format_params(dict(stage.params)), width=96, break_long_words=False,
                                break_on_hyphens=False)
        lines.extend(f"       {' ' * width}  {line}" for line in wrapped)
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
