"""Verify stage: prove the shard stage's checkpoint numerically, on CPU, before any engine is built.

Writes verify.json and verify.md into the stage's entry (published at <output>/verify/); a
checkpoint out of tolerance raises StageFailed naming each failing figure, and the cache keeps
nothing, so the next build checks again.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recipe_runner.errors import StageFailed

if TYPE_CHECKING:
    from recipe_runner.cache import Entry
    from recipe_runner.resolve import ResolvedPlan


def run_verify(resolved: "ResolvedPlan", entries: dict[str, "Entry"], data_dir: Path, workers: int) -> None:
    from recipe_runner.verify.report import ReportContext, write_report
    from recipe_runner.verify.run import failure_summary, verify_checkpoint

    recipe = resolved.plan.recipe
    spec = recipe.data["verify"]
    result = verify_checkpoint(entries["shard"].path, resolved.source_dir, prompts=list(spec["prompts"]),
                               token_ids=[list(ids) for ids in spec["token_ids"]],
                               tolerances=dict(spec.get("tolerances") or {}), tolerances_from="recipe")
    context = ReportContext(recipe.name, recipe.canonical_hash(), resolved.status("shard").key.digest)
    write_report(data_dir, result, context)
    if not result.passed:
        raise StageFailed(f"verify: {failure_summary(result)}\n"
                          f"set verify.tolerances (at {recipe.location('verify')}) only if these figures are "
                          "acceptable for this model; `--no-verify` skips the check")
