"""The verify report: verify.json (every figure, limit and input) and verify.md, rendered from the
same data with the packaged Jinja2 template in a sandboxed environment.

Reports written by a build carry no paths or times, so they are byte-identical across machines
and runs (the lock file records them); standalone reports name the directories they compared.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from recipe_runner.verify.run import VerifyResult

REPORT_FORMAT = "recipe-runner/verify-report/1"
JSON_NAME = "verify.json"
MARKDOWN_NAME = "verify.md"
TEMPLATE = "verify.md.j2"
_ROWS = (  # figure, limit, label, comparison
    ("max_abs_logit_error", "max_abs_logit_error", "max abs logit error", "<="),
    ("mean_abs_logit_error", "mean_abs_logit_error", "mean abs logit error", "<="),
    ("mean_kl", "mean_kl", "mean KL(source ‖ checkpoint)", "<="),
    ("top1_agreement", "min_top1_agreement", "top-1 agreement", ">="),
)


@dataclass(frozen=True)
class ReportContext:
    recipe_name: str | None = None
    recipe_sha256: str | None = None
    checkpoint_key: str | None = None  # the shard stage's cache key (builds)
    checkpoint_path: str | None = None  # standalone checks only
    source_path: str | None = None  # standalone checks only


def report_dict(result: VerifyResult, ctx: ReportContext) -> dict:
    from recipe_runner.verify.metrics import round_figure  # torch: kept off the warm path (name_recipe)

    recipe = {"name": ctx.recipe_name, "sha256": ctx.recipe_sha256} if ctx.recipe_name else None
    checkpoint = {**result.checkpoint, "stage_key": ctx.checkpoint_key, "path": ctx.checkpoint_path}
    return {
        "format": REPORT_FORMAT,
        "passed": result.passed,
        "recipe": recipe,
        "checkpoint": checkpoint,
        "source": ctx.source_path,
        "figures": result.figures.to_dict(),
        "tolerances": {k: round_figure(v) for k, v in result.tolerances.to_dict().items()},
        "tolerance_sources": dict(result.tolerance_sources),
        "failures": [{**f.to_dict(), "value": round_figure(f.value)} for f in result.failures],
        "inputs": [{**i.to_dict(), "figures": f.to_dict()} for i, f in zip(result.inputs, result.per_input)],
    }


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _num(value: object) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict) -> str:
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, trim_blocks=True,
                                        lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(cell=_cell, num=_num)
    text = (resources.files("recipe_runner") / "templates" / TEMPLATE).read_text(encoding="utf-8")
    failed = {f["figure"] for f in report["failures"]}
    rows = [{"label": label, "value": report["figures"][figure], "limit": report["tolerances"][limit], "op": op,
             "source": report["tolerance_sources"][limit], "ok": figure not in failed}
            for figure, limit, label, op in _ROWS]
    return env.from_string(text).render(**report, rows=rows)


def write_report(directory: Path, result: VerifyResult, ctx: ReportContext) -> tuple[Path, Path]:
    """verify.json and verify.md in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    report = report_dict(result, ctx)
    json_path, md_path = directory / JSON_NAME, directory / MARKDOWN_NAME
    json_path.write_bytes(_report_json(report))
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path


def _report_json(report: dict) -> bytes:
    return (json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def name_recipe(report_json: bytes, recipe_name: str, recipe_sha256: str) -> tuple[bytes, bytes]:
    """A build's cached verify.json (which names no recipe) as the recipe publishing it sees it:
    (verify.json, verify.md) with the recipe's name and canonical hash filled in."""
    report = json.loads(report_json)
    report["recipe"] = {"name": recipe_name, "sha256": recipe_sha256}
    return _report_json(report), render_markdown(report).encode("utf-8")


def format_summary(result: VerifyResult) -> str:
    """A few lines for the terminal: each figure against its limit, then the verdict."""
    return format_report_summary(report_dict(result, ReportContext()))


def format_report_summary(report: dict) -> str:
    """format_summary from a report's data, e.g. a published verify.json (what `recipe demo` prints)."""
    figures, limits, sources = report["figures"], report["tolerances"], report["tolerance_sources"]
    failed = {f["figure"] for f in report["failures"]}
    lines = [f"{len(report['inputs'])} input(s), {figures['tokens']} tokens"]
    for figure, limit, _, op in _ROWS:
        verdict = "OUT OF TOLERANCE" if figure in failed else "ok"
        lines.append(f"  {figure:<21} {_num(figures[figure]):>10}  {op} {_num(limits[limit]):<8} "
                     f"({sources[limit]})  {verdict}")
    lines.append(f"  perplexity            source {_num(figures['perplexity_source'])}, "
                 f"checkpoint {_num(figures['perplexity_checkpoint'])}")
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


def read_report_summary(json_path: Path) -> str:
    """format_report_summary of a verify.json file."""
    return format_report_summary(json.loads(json_path.read_text(encoding="utf-8")))
