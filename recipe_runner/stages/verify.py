"""Verify stage: prove every checkpoint the recipe writes numerically, on CPU (or --device), before any engine is
built: the shard stage's TensorRT-LLM checkpoint and each HF export (hf-modelopt,
hf-compressed-tensors), in stages/registry.py order (VERIFIED_STAGES).

Writes verify.json and verify.md into the stage's entry (published at <output>/verify/) for the
first checkpoint, and into <target>/ beneath it for each further one. A checkpoint out of
tolerance raises StageFailed naming each failing figure (after every checkpoint was checked), and
the cache keeps nothing, so the next build checks again.
"""
from __future__ import annotations

from recipe_runner.errors import StageFailed
from recipe_runner.recipe.model import thaw
from recipe_runner.stages.registry import STAGES, VERIFIED_STAGES, StageJob
from recipe_runner.verify.inputs import PerplexityText, VerifyInput, perplexity_windows
from recipe_runner.verify.report import ReportContext, write_report
from recipe_runner.verify.run import failure_summary, verify_checkpoint


def held_out_windows(job: "StageJob") -> list[VerifyInput]:
    """verify.perplexity's windows (the same for every checkpoint checked), or none."""
    spec = job.params.get("perplexity")
    if spec is None:
        return []
    text = PerplexityText(spec["dataset"], job.inputs["verify-data"], spec["text_field"], spec["split"],
                          spec.get("revision"), spec["num_tokens"], spec["seq_len"])
    return perplexity_windows(job.inputs["source"], text, trust_remote_code=job.params["trust_remote_code"])


def run_verify(job: "StageJob") -> None:
    spec = job.params
    checked = [s for s in VERIFIED_STAGES if s in job.inputs]
    windows = held_out_windows(job)
    failed = []
    for i, stage in enumerate(checked):
        result = verify_checkpoint(job.inputs[stage], job.inputs["source"], prompts=list(spec["prompts"]),
                                   token_ids=[list(ids) for ids in spec["token_ids"]],
                                   tolerances=thaw(spec.get("tolerances") or {}), tolerances_from="recipe",
                                   trust_remote_code=spec["trust_remote_code"], perplexity_inputs=windows,
                                   progress=job.progress.part_of(i, len(checked)),
                                   device=job.devices[0])  # one sequence at a time: the first device
        # No recipe identity here: recipes that share this key share these bytes. Publishing
        # names the recipe (execute.recipe_reports).
        context = ReportContext(checkpoint_key=job.input_keys[stage])
        write_report(job.out_dir if i == 0 else job.out_dir / STAGES[stage].target, result, context)
        if not result.passed:
            prefix = f"{STAGES[stage].target}: " if len(checked) > 1 else ""
            failed.append(prefix + failure_summary(result))
    if failed:  # the build names where verify.tolerances goes in the recipe (execute.execute_stage)
        raise StageFailed("verify: " + "\n".join(failed) + "\n"
                          "set verify.tolerances only if these figures are acceptable for this model; "
                          "`--no-verify` skips the check", field="verify")
