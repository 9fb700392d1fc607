"""The `recipe` command: thin; parses arguments, calls the API, maps errors to exit codes."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from recipe_runner import __version__
from recipe_runner.errors import RecipeError, RecipeRunnerError, UserError

app = typer.Typer(
    help="Declarative, reproducible TensorRT-LLM checkpoint and engine builds from Hugging Face LLaMA-family models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

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


@app.command()
def validate(
    files: List[Path] = typer.Argument(..., help="Recipe files to check."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Validate recipes: one line per file (OK, or every problem with file:line:col). Exit 2 if any is invalid."""
    failed = 0
    for file in files:
        try:
            recipe = _load(file, set_)
        except RecipeError as exc:
            failed += 1
            typer.echo(f"FAIL {file}", err=True)
            for problem in exc.problems:
                typer.echo(f"  {problem}", err=True)
        else:
            typer.echo(f"OK   {file} ({recipe.name}, sha256 {recipe.canonical_hash()[:12]})")
    if failed:
        typer.echo(f"{failed} of {len(files)} recipe(s) invalid", err=True)
        raise typer.Exit(2)


@app.command()
def show(
    file: Path = typer.Argument(..., help="Recipe file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    format: str = typer.Option("yaml", "--format", help="yaml (readable) or json (canonical, what is hashed)."),
) -> None:
    """Print the fully resolved, normalized recipe (extends merged, variables substituted, defaults filled)."""
    recipe = _load(file, set_)
    if format == "json":
        typer.echo(recipe.canonical_json())
    elif format == "yaml":
        typer.echo(f"# {recipe.path}: normalized recipe, sha256 {recipe.canonical_hash()}")
        typer.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True, width=4096).rstrip())
    else:
        raise UserError(f"--format {format}: choose yaml or json")


@app.command()
def plan(
    file: Path = typer.Argument(..., help="Recipe file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    until: Optional[str] = typer.Option(None, "--until", help="Plan only up to this stage (or `checkpoint`)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Leave out the verify stage."),
    format: str = typer.Option("text", "--format", help="text or json."),
) -> None:
    """Print the ordered stages `build` would run, with each stage's inputs and parameters."""
    from recipe_runner.plan import make_plan
    from recipe_runner.report import format_plan

    the_plan = make_plan(_load(file, set_), until=until, skip_verify=no_verify)
    if format == "json":
        typer.echo(json.dumps(the_plan.to_dict(), indent=2, sort_keys=True))
    elif format == "text":
        typer.echo(format_plan(the_plan))
    else:
        raise UserError(f"--format {format}: choose text or json")


@app.command()
def build(
    file: Path = typer.Argument(..., help="Recipe file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage; `checkpoint` stops before the engine."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the verify stage."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes writing rank files (default: the recipe's `workers`)."),
) -> None:
    """Run the plan and publish the artifacts to the recipe's output directory."""
    from recipe_runner.build import run_build
    from recipe_runner.plan import make_plan

    the_plan = make_plan(_load(file, set_), until=until, skip_verify=no_verify)
    result = run_build(the_plan, workers=workers, echo=typer.echo)
    typer.echo(f"built {the_plan.recipe.name}: {result}")


@app.command()
def schema(
    path: bool = typer.Option(False, "--path", help="Print only the schema file's path."),
) -> None:
    """Print the recipe JSON Schema (draft 2020-12) that every recipe is validated against."""
    from recipe_runner.recipe.schema import schema_path

    typer.echo(str(schema_path()) if path else schema_path().read_text(encoding="utf-8").rstrip())


@app.command()
def demo(
    directory: Path = typer.Option(Path("build/demo"), "--dir", help="Where the tiny model is generated."),
    recipe_file: Path = typer.Option(Path("recipes/demo/tiny-llama.yaml"), "--recipe", help="The demo recipe."),
) -> None:
    """Generate a tiny seeded random LLaMA locally and build it with the shipped demo recipe."""
    from recipe_runner.build import run_build
    from recipe_runner.demo import make_tiny_llama
    from recipe_runner.plan import make_plan
    from recipe_runner.recipe import load_recipe

    if not recipe_file.is_file():
        raise UserError(f"{recipe_file}: demo recipe not found; run `recipe demo` from the root of a recipe-runner "
                        "checkout or pass --recipe PATH")
    model_dir = make_tiny_llama(directory / "tiny-llama-hf")
    typer.echo(f"generated a tiny random LLaMA in {model_dir}")
    the_plan = make_plan(load_recipe(recipe_file, {"model_dir": str(model_dir.resolve())}))
    result = run_build(the_plan, workers=None, echo=typer.echo)
    typer.echo(f"built {the_plan.recipe.name}: {result}")


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user errors print their message (no traceback) and exit non-zero."""
    try:
        app(args=argv, prog_name="recipe", standalone_mode=True)
    except RecipeRunnerError as exc:
        typer.echo(f"error: {exc}" if not isinstance(exc, RecipeError) else str(exc), err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
