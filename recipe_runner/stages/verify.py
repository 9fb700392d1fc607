"""Verify stage: prove every checkpoint the recipe writes numerically, on CPU, before any engine is
built: the shard stage's TensorRT-LLM checkpoint and each HF export (hf-modelopt,
hf-compressed-tensors), in stages/registry.py order (VERIFIED_STAGES).

Writes verify.json and verify.md into the stage's entry (published at <output>/verify/) for the
first checkpoint, and into <target>/ beneath it for each further one. A checkpoint out of
tolerance raises StageFailed naming each failing figure (after every checkpoint was checked), and
the cache keeps nothing, so the next build checks again.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recipe_runner.errors import StageFailed

if TYPE_CHECKING:
    from recipe_runner.store.entry import Entry
    from recipe_runner.pipeline.resolve import ResolvedPlan



def run_verify(resolved: "ResolvedPlan", entries: dict[str, "Entry"], data_dir: Path, workers: int) -> None:
    from recipe_runner.stages.registry import STAGES, VERIFIED_STAGES
    from recipe_runner.verify.report import ReportContext, write_report
    from recipe_runner.verify.run import failure_summary, verify_checkpoint

    recipe = resolved.plan.recipe
    spec = recipe.data["verify"]
    checked = [s for s in VERIFIED_STAGES if s in entries]
    failed = []
    for i, stage in enumerate(checked):
        result = verify_checkpoint(entries[stage].path, resolved.source_dir, prompts=list(spec["prompts"]),
                                   token_ids=[list(ids) for ids in spec["token_ids"]],
                                   tolerances=dict(spec.get("tolerances") or {}), tolerances_from="recipe",
                                   trust_remote_code=recipe.data["source"]["trust_remote_code"])
        # No recipe identity here: recipes that share this key share these bytes. Publishing
        # names the recipe (build.recipe_reports).
        context = ReportContext(checkpoint_key=resolved.status(stage).key.digest)
        write_report(data_dir if i == 0 else data_dir / STAGES[stage].target, result, context)
        if not result.passed:
            prefix = f"{STAGES[stage].target}: " if len(checked) > 1 else ""
            failed.append(prefix + failure_summary(result))
    if failed:
        raise StageFailed("verify: " + "\n".join(failed) + "\n"
                          f"set verify.tolerances (at {recipe.location('verify')}) only if these figures are "
                          "acceptable for this model; `--no-verify` skips the check")
