"""What a finished build says: the text summary (one line per recipe, one per stage with its time
and peak memory) and the per-recipe summaries of `build --format json` (pipeline.report)."""
from __future__ import annotations

import json

from recipe_runner.pipeline.plan import Plan
from recipe_runner.pipeline.progress import format_size
from recipe_runner.pipeline.scheduler import BuildReport, Job
from recipe_runner.stages.registry import PUBLISHED
from recipe_runner.store.lock import BUILD_RECORD_NAME
from recipe_runner.verify.report import JSON_NAME


def format_summary(report: BuildReport) -> str:
    """One line per recipe: status, time spent in its stages, output directory (or why it failed)."""
    rows = []
    for index, plan in enumerate(report.plans):
        name = plan.plan.recipe.name
        seconds = sum((report.jobs[s.key.digest].record or {}).get("seconds", 0) for s in plan.statuses)
        if index in report.results:
            rows.append((name, "built", f"{seconds:.1f}s", str(report.results[index].output_dir)))
        else:
            message = str(report.failures[index][1]).strip().splitlines()[0]
            rows.append((name, "FAILED", f"{seconds:.1f}s", message))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {n:<{width}}  {s:<6}  {t:>8}  {o}" for n, s, t, o in rows)


def format_stage_table(report: BuildReport) -> str:
    """One line per stage run or found (shared stages once): action, seconds, peak RSS, and in
    builds of several recipes, which."""
    rows = []
    for job in report.jobs.values():
        record = job.record or {}
        peak = record.get("peak_rss_bytes")
        rows.append((job.stage, record.get("action") or job.state,
                     f"{record['seconds']:.1f} s" if record.get("seconds") is not None else "-",
                     f"peak {format_size(peak)}" if peak else "", report.whose(job)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {n:<{width}}  {a:<7} {t:>9}  {m:<15} {w}".rstrip() for n, a, t, m, w in rows)


def _stage_summary(job: Job, name: str) -> dict:
    record = job.record or {}
    action = record.get("action") or ("failed" if job.state == "failed" else "skipped")
    return {"name": name, "key": job.key, "action": action, "seconds": record.get("seconds"),
            "peak_rss_bytes": record.get("peak_rss_bytes")}


def verify_summary(output_dir) -> dict | None:
    """The published verify report's verdict and figures (<output>/verify/verify.json), if any."""
    path = output_dir / PUBLISHED["verify"] / JSON_NAME
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return {"report": str(path), "passed": report["passed"], "figures": report["figures"],
            "tolerances": report["tolerances"]}


def build_summaries(report: BuildReport) -> list[dict]:
    """Per recipe: name, status (built/failed), exit code and message, its stages (name, key, action
    ran/cached/failed/skipped, seconds, peak RSS), outputs (dir, lock, build record), the verify
    figures when published."""
    out = []
    for index, plan in enumerate(report.plans):
        stages = [_stage_summary(report.jobs[s.key.digest], s.stage.name) for s in plan.statuses]
        result = report.results.get(index)
        code, error = report.failures.get(index, (0, None))
        out.append({"name": plan.plan.recipe.name, "recipe": str(plan.plan.recipe.path),
                    "status": "built" if result is not None else "failed", "exit_code": code,
                    "message": None if error is None else str(error).strip(),
                    "seconds": round(sum(s["seconds"] or 0 for s in stages), 3), "stages": stages,
                    "outputs": None if result is None else {"dir": str(result.output_dir), "lock": str(result.lock_path),
                                                            "build_record": str(result.output_dir / BUILD_RECORD_NAME)},
                    "verify": None if result is None else verify_summary(result.output_dir)})
    return out


def not_run_summaries(plans: list[Plan], exit_code: int, message: str) -> list[dict]:
    """Per recipe, when the build was refused before any stage ran."""
    return [{"name": p.recipe.name, "recipe": str(p.recipe.path), "status": "failed", "exit_code": exit_code,
             "message": message, "seconds": 0, "stages": [], "outputs": None, "verify": None} for p in plans]
