"""The verify report: verify.json (every figure, limit and input) and verify.md, rendered from the
same data with the packaged Jinja2 template in a sandboxed environment.

Reports written by a build carry no paths or times, so they are byte-identical across machines
and runs (the lock file records them); standalone reports name the directories they compared.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from recipe_runner.verify.run import VerifyResult

REPORT_FORMAT = "recipe-runner/verify-report/2"  # 2: figures.max_layer_error and the layer trace
JSON_NAME = "verify.json"
MARKDOWN_NAME = "verify.md"
TEMPLATE = "verify.md.j2"
_ROWS = (  # figure, limit, label, comparison
    ("max_abs_logit_error", "max_abs_logit_error", "max abs logit error", "<="),
    ("mean_abs_logit_error", "mean_abs_logit_error", "mean abs logit error", "<="),
    ("mean_kl", "mean_kl", "mean KL(source ‖ checkpoint)", "<="),
    ("top1_agreement", "min_top1_agreement", "top-1 agreement", ">="),
    ("max_layer_error", "max_layer_error", "worst decoder layer's error", "<="),
)
BAR_WIDTH = 24  # characters of the layer chart's widest bar in verify.md


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
        "figures": {**result.figures.to_dict(), "max_layer_error": round_figure(result.trace.max_layer_error)},
        "layers": result.trace.to_dict(),
        "perplexity": None if result.perplexity is None else result.perplexity.to_dict(),
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
    if report["perplexity"] is not None:
        rows.append({"label": "perplexity ratio (held-out text)", "value": report["perplexity"]["perplexity_ratio"],
                     "limit": report["tolerances"]["max_perplexity_ratio"], "op": "<=",
                     "source": report["tolerance_sources"]["max_perplexity_ratio"], "ok": "perplexity_ratio" not in failed})
    return env.from_string(text).render(**report, rows=rows, chart=layer_chart(report["layers"]["layers"]))


def layer_chart(layers: list[dict]) -> list[dict]:
    """Each layer's row of verify.md's chart: its errors and a bar, on a log scale from the smallest
    error shown to the largest (so a layer 40x above the rest stands out at a glance)."""
    values = [max(e["layer_error"], 1e-12) for e in layers]
    if not values:
        return []
    low, high = math.log10(min(values)), math.log10(max(values))
    span = max(high - low, 1e-9)
    return [{**e, "bar": "█" * max(1, round(BAR_WIDTH * (math.log10(v) - low) / span)) if high > low else "█"}
            for e, v in zip(layers, values)]


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
    held_out = report["perplexity"]
    if held_out is not None:
        verdict = "OUT OF TOLERANCE" if "perplexity_ratio" in failed else "ok"
        lines.append(f"  held-out perplexity   source {_num(held_out['perplexity_source'])}, checkpoint "
                     f"{_num(held_out['perplexity_checkpoint'])}: ratio {_num(held_out['perplexity_ratio'])} <= "
                     f"{_num(limits['max_perplexity_ratio'])} ({sources['max_perplexity_ratio']}), recovery "
                     f"{_num(held_out['recovery'])}, {held_out['tokens']} tokens  {verdict}")
    trace = report["layers"]
    if trace["first_jump"] is not None:
        lines.append(f"  layer {trace['first_jump']} is the first whose error stands out from the others' "
                     f"(worst: layer {trace['worst_layer']}); verify.md has the layer-by-layer table")
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


def read_report_summary(json_path: Path) -> str:
    """format_report_summary of a verify.json file."""
    return format_report_summary(json.loads(json_path.read_text(encoding="utf-8")))
