"""The `recipe` command: thin; parses arguments, calls the API, maps errors to exit codes.

Imports inside functions keep torch (verify, demo) off the warm path and every other command, and
jinja2/jsonschema (recipes, the pipeline) off the commands that read no recipe: `--help`, `cache`, `verify-lock`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from recipe_runner import __version__
from recipe_runner.cli_cache import CACHE_HELP, _store, cache_app
from recipe_runner.cli_verify import demo, verify_command
from recipe_runner.devices import parse_device
from recipe_runner.errors import RecipeError, RecipeRunnerError, UserError
from recipe_runner.store.gc import parse_size
from recipe_runner.store.lock import read_lock, verify_lock
from recipe_runner.trtllm.toolchain import require_toolchain

app = typer.Typer(
    help="Declarative, reproducible TensorRT-LLM checkpoint and engine builds from Hugging Face LLaMA-family models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(cache_app, name="cache")
app.command("verify")(verify_command)
app.command("demo")(demo)
DEVICE_HELP = ("Where calibrate and verify compute: auto (every GPU torch sees, else cpu), cpu, cuda, cuda:N or "
               "cuda:0,cuda:1 (default: $RECIPE_DEVICE, else cpu). A GPU kind enters those stages' keys.")
SET_HELP = "Set a recipe variable (overrides `vars:`), e.g. --set models_dir=/data/hf. Repeatable."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"recipe-runner {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the recipe-runner version and exit."),
) -> None:
    """Validate, inspect, plan and build recipes (see README.md)."""


def _variables(sets: Optional[List[str]]) -> dict:
    from recipe_runner.recipe.template import parse_set_option

    out = {}
    for item in sets or []:
        try:
            name, value = parse_set_option(item)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        out[name] = value
    return out


def _load(file: Path, sets: Optional[List[str]]):
    from recipe_runner.recipe import load_recipe

    return load_recipe(file, _variables(sets))


def _load_all(files: List[Path], sets: Optional[List[str]]) -> list:
    """Every recipe the files mean (a file with `matrix:` means several), in order."""
    from recipe_runner.recipe import load_recipes

    variables = _variables(sets)
    return [recipe for file in files for recipe in load_recipes(file, variables)]


def _check_format(format: str, choices: tuple[str, ...] = ("text", "json")) -> None:
    if format not in choices:
        raise UserError(f"--format {format}: choose {' or '.join(choices)}")


def _echo_json(document: dict) -> None:
    typer.echo(json.dumps(document, indent=2, sort_keys=True))


JSON_HELP = "text or json (one versioned document: README, Machine-readable output)."


@app.command()
def validate(
    files: List[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    format: str = typer.Option("text", "--format", help=JSON_HELP),
) -> None:
    """Validate recipes: one line per file (OK, or every problem with file:line:col). Exit 2 if any is invalid."""
    from recipe_runner.pipeline.report import problems_json, validate_document

    _check_format(format)
    failed, results = 0, []
    for file in files:
        try:
            recipes = _load_all([file], set_)
        except RecipeError as exc:
            failed += 1
            results.append({"file": str(file), "ok": False, "recipes": [], "errors": problems_json(exc.problems)})
            if format == "text":
                typer.echo(f"FAIL {file}", err=True)
                for problem in exc.problems:
                    typer.echo(f"  {problem}", err=True)
        else:
            results.append({"file": str(file), "ok": True, "errors": [],
                            "recipes": [{"name": r.name, "sha256": r.canonical_hash()} for r in recipes]})
            if format == "text" and len(recipes) == 1:
                typer.echo(f"OK   {file} ({recipes[0].name}, sha256 {recipes[0].canonical_hash()[:12]})")
            elif format == "text":
                typer.echo(f"OK   {file} (matrix of {len(recipes)}: {', '.join(r.name for r in recipes)})")
    if format == "json":
        _echo_json(validate_document(results))
    elif failed:
        typer.echo(f"{failed} of {len(files)} recipe(s) invalid", err=True)
    if failed:
        raise typer.Exit(2)


@app.command()
def show(
    file: Path = typer.Argument(..., help="Recipe file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    format: str = typer.Option("yaml", "--format", help="yaml (readable) or json (canonical, what is hashed)."),
) -> None:
    """Print the fully resolved, normalized recipe (extends merged, variables substituted, defaults
    filled); a matrix file prints each variant (YAML documents separated by ---)."""
    if format not in ("yaml", "json"):
        raise UserError(f"--format {format}: choose yaml or json")
    for index, recipe in enumerate(_load_all([file], set_)):
        if format == "json":
            typer.echo(recipe.canonical_json())
            continue
        if index:
            typer.echo("---")
        typer.echo(f"# {recipe.path}: normalized recipe, sha256 {recipe.canonical_hash()}")
        typer.echo(f"# {_target_release_line(recipe)}")
        typer.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, width=4096).rstrip())


def _target_release_line(recipe) -> str:
    from recipe_runner.stages.registry import target_release
    from recipe_runner.trtllm.releases import FIELD, release_named

    release = release_named(target_release(recipe.data))
    if recipe.data.get(FIELD):
        return f"{FIELD}: {release.describe()}"
    engine = " (a build of its engine targets the installed trtllm-build's release instead)" if "engine" in recipe.data else ""
    return f"{FIELD} unset: {release.describe()}, the newest recorded{engine}"


def _optional_toolchain(the_plan):
    """trtllm-build for `plan` to key the engine stage with, or None (plan still shows the rest)."""
    try:
        return require_toolchain() if the_plan.stage("build-engine") is not None else None
    except UserError:
        return None


FORCE_HELP = ("Publish into a non-empty output.dir that recipe-runner did not write, beside its files (none of "
              "them is changed or removed).")


@app.command()
def plan(
    files: List[Path] = typer.Argument(..., help="Recipe files (a matrix file counts for each variant)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    until: Optional[str] = typer.Option(None, "--until", help="Plan only up to this stage (or `checkpoint`)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Leave out the verify stage."),
    format: str = typer.Option("text", "--format", help=JSON_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    rehash: bool = typer.Option(False, "--rehash", help="Hash the source files again instead of trusting the memo."),
    check: bool = typer.Option(False, "--check", help="Preflight: exit 2 listing everything `build` would refuse "
                                                       "(source, calibration data, tokenizer, trtllm-build, outputs)."),
    force: bool = typer.Option(False, "--force", help="With --check: check the outputs as `build --force` would."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Print the ordered stages `build` would run: inputs, parameters, cache key, cached or why not;
    over several recipes, also the stages they share (built once)."""
    from recipe_runner.pipeline.execute import preflight
    from recipe_runner.pipeline.plan import make_plan
    from recipe_runner.pipeline.report import format_plan, format_shared, plan_document
    from recipe_runner.pipeline.resolve import resolve

    _check_format(format)
    store = _store(cache_dir)
    choice = parse_device(device)
    plans = [make_plan(r, until=until, skip_verify=no_verify, collect=check, device=choice)
             for r in _load_all(files, set_)]
    if check:
        checked = preflight(plans, store, force=force)
        if checked.problems:
            if format == "json":
                _echo_json(plan_document(plans, [None] * len(plans), checked=True, problems=checked.problems))
            else:
                for problem in checked.problems:
                    typer.echo(str(problem), err=True)
                typer.echo(f"{len(checked.problems)} problem(s) found before running", err=True)
            raise typer.Exit(2)
        plans, toolchain = checked.plans, checked.toolchain
    else:
        toolchain = next((t for t in map(_optional_toolchain, plans) if t is not None), None)
    resolved = [resolve(p, store, rehash=rehash, toolchain=toolchain) if p.source.directory else None for p in plans]
    if format == "json":
        _echo_json(plan_document(plans, resolved, checked=check))
        return
    typer.echo("\n\n".join(format_plan(p, r) for p, r in zip(plans, resolved)))
    if len(plans) > 1:
        typer.echo("\n" + format_shared(resolved))
    if check:
        typer.echo("preflight: OK, nothing found that would stop the build", err=True)


@app.command()
def build(
    files: List[Path] = typer.Argument(..., help="Recipe files (a matrix file builds each variant)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage; `checkpoint` stops before the engine."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the verify stage."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes writing rank files (default: the recipe's `workers`)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    rehash: bool = typer.Option(False, "--rehash", help="Hash the source files again instead of trusting the memo."),
    locked: Optional[Path] = typer.Option(None, "--locked", help="Rebuild every stage and fail unless the outputs are bit-identical to this lock file."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Stages run at once (local executor: worker processes)."),
    executor: str = typer.Option("local", "--executor", help="local (process pool) or ray."),
    address: str = typer.Option("auto", "--address", help="Ray cluster: auto, local (start one here) or ray://host:port."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for stages running at once, e.g. 20G."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop starting stages after the first failure."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan, preflight and key every stage, print which would run, exit 0 without running any."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print every stage's full cache key and why it runs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and the final summary."),
    format: str = typer.Option("text", "--format", help=JSON_HELP + " Progress lines then go to stderr."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
) -> None:
    """Run the plans (skipping cached stages, sharing equal ones), publish each recipe's outputs and recipe.lock."""
    from recipe_runner.pipeline.plan import make_plan
    from recipe_runner.pipeline.report import build_document
    from recipe_runner.pipeline.scheduler import make_executor, run_builds
    from recipe_runner.pipeline.summary import build_summaries, format_stage_table, format_summary, not_run_summaries

    _check_format(format)
    if verbose and quiet:
        raise UserError("--verbose and --quiet: choose one")
    echo = (lambda line: None) if quiet else (lambda line: _log_line(line, err=format == "json"))
    choice = parse_device(device)
    plans = [make_plan(r, until=until, skip_verify=no_verify, collect=True, device=choice)
             for r in _load_all(files, set_)]
    if locked is not None and len(plans) != 1:
        raise UserError("--locked rebuilds one recipe: give a single recipe file (not a matrix)")
    if dry_run:
        return _dry_run(plans, _store(cache_dir), rehash=rehash, force=force, format=format, echo=echo)
    lock = {0: read_lock(locked)} if locked is not None else None
    try:
        report = run_builds(plans, store=_store(cache_dir), executor=make_executor(executor, jobs, address, echo),
                            workers=workers, rehash=rehash, locked=lock, fail_fast=fail_fast,
                            max_memory=parse_size(max_memory) if max_memory else None, force=force,
                            verbose=verbose, echo=echo)
    except RecipeRunnerError as exc:
        if format != "json":
            raise
        problems = exc.problems if isinstance(exc, RecipeError) else [exc]
        message = f"not run: {len(problems)} problem(s) found before running (see problems)"
        _echo_json(build_document(not_run_summaries(plans, exc.exit_code, message), exc.exit_code, problems))
        raise typer.Exit(exc.exit_code)
    if format == "json":
        _echo_json(build_document(build_summaries(report), report.exit_code))
        raise typer.Exit(report.exit_code)
    if len(plans) == 1:
        report.raise_first_failure()
        result = report.results[0]
        ran = sum(1 for t in result.trace if t["action"] == "ran")
        typer.echo(f"built {plans[0].recipe.name}: {ran} stage(s) run, {len(result.trace) - ran} cached; "
                   f"output {result.output_dir}, lock {result.lock_path}")
        typer.echo(format_stage_table(report))
        if locked is not None:
            typer.echo(f"bit-identical to {locked}")
        return
    ran = sum(1 for t in report.trace() if t["action"] == "ran")
    typer.echo(f"{len(report.results)} of {len(plans)} recipe(s) built, {ran} stage(s) run for {len(plans)} recipes:")
    typer.echo(format_summary(report))
    typer.echo("stages:\n" + format_stage_table(report))
    for index, (code, error) in sorted(report.failures.items()):
        typer.echo(f"{plans[index].recipe.name}: {error}", err=True)
    if report.failures:
        raise typer.Exit(report.exit_code)


def _log_line(line: str, err: bool) -> None:
    # print, not typer.echo: print writes to sys.stdout/sys.stderr as they are now, which the live
    # progress display (pipeline.progress) replaces to print log lines above itself; click's echo
    # would reach the real stream's buffer underneath and land on the half-drawn display
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def _dry_run(plans: list, store, *, rehash: bool, force: bool, format: str, echo) -> None:
    """build --dry-run: what build would do (the preflight refuses as build does), running nothing."""
    from recipe_runner.pipeline.execute import prepare
    from recipe_runner.pipeline.report import format_dry_run, plan_document

    resolved = prepare(plans, store, rehash=rehash, force=force, echo=echo)
    if format == "json":
        return _echo_json(plan_document([r.plan for r in resolved], resolved, checked=True))
    typer.echo(format_dry_run(resolved))


@app.command("verify-lock")
def verify_lock_command(
    lock_file: Path = typer.Argument(..., help="A recipe.lock inside a published output directory."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Also recheck this recipe and its inputs here (source, tokenizer and calibration files, the dataset snapshot) against the lock."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a declared var of --recipe: name=value."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Recheck a published output directory against its lock file (sizes and sha256 of every file)."""
    from recipe_runner.pipeline.execute import recheck_inputs

    inputs = recheck_inputs(_load(recipe, set_), _store(cache_dir)) if recipe is not None else None
    problems = verify_lock(lock_file, inputs)
    if problems:
        typer.echo(f"{lock_file}: {len(problems)} difference(s):", err=True)
        for line in problems:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {lock_file}: every output file matches" + (" and every input file" if recipe else ""))


@app.command()
def diff(
    files: List[Path] = typer.Argument(..., help="OLD.yaml NEW.yaml, or one FILE with --rev."),
    rev: Optional[str] = typer.Option(None, "--rev", help="Compare FILE as committed at this git revision with the working copy."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    format: str = typer.Option("text", "--format", help="text or markdown (for pasting into a review)."),
) -> None:
    """Semantic difference of two normalized recipes, and which stages it makes rebuild."""
    from recipe_runner.pipeline.diff import format_diff, load_recipe_at_revision

    if format not in ("text", "markdown"):
        raise UserError(f"--format {format}: choose text or markdown")
    variables = _variables(set_)
    if rev is not None:
        if len(files) != 1:
            raise UserError("with --rev, give exactly one recipe file")
        old, new = load_recipe_at_revision(rev, files[0], variables), _load(files[0], set_)
        labels = (f"{files[0]}@{rev}", str(files[0]))
    else:
        if len(files) != 2:
            raise UserError("give two recipe files (OLD NEW), or one file with --rev REV")
        old, new = _load(files[0], set_), _load(files[1], set_)
        labels = (str(files[0]), str(files[1]))
    typer.echo(format_diff(*labels, old, new, markdown=format == "markdown"))


@app.command()
def schema(
    path: bool = typer.Option(False, "--path", help="Print only the schema file's path."),
) -> None:
    """Print the recipe JSON Schema (draft 2020-12) that every recipe is validated against."""
    from recipe_runner.recipe.schema import schema_path

    typer.echo(str(schema_path()) if path else schema_path().read_text(encoding="utf-8").rstrip())


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors print their message (no traceback) and exit non-zero."""
    try:
        app(args=argv, prog_name="recipe", standalone_mode=True)
    except RecipeRunnerError as exc:
        typer.echo(f"error: {exc}" if not isinstance(exc, RecipeError) else str(exc), err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
