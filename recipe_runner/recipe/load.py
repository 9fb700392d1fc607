"""Load = parse + extend + substitute + validate + normalize, with every problem located."""
from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any, Mapping

from recipe_runner.errors import Location, Problem, RecipeError
from recipe_runner.recipe.matrix import expand_matrix
from recipe_runner.recipe.model import Recipe
from recipe_runner.checks.recipe import check_rules
from recipe_runner.recipe.schema import recipe_schema, validate_against_schema
from recipe_runner.recipe.template import render_templates
from recipe_runner.recipe.yaml_positions import ForeignFile, Positions, dotted, read_yaml


def load_recipe(path: str | os.PathLike, variables: Mapping[str, Any] | None = None) -> Recipe:
    """Read, validate and normalize one recipe; raise RecipeError with every problem found.

    `variables` (from `--set`) override the recipe's `vars:` and must be declared there (or in
    a base it extends). A file with a `matrix:` means several recipes: read it with `load_recipes`.
    """
    recipes = load_recipes(path, variables)
    if len(recipes) != 1:
        raise RecipeError([Problem(recipes[0].location("name"), "matrix",
                                   f"this file is a matrix of {len(recipes)} recipes; use load_recipes()")])
    return recipes[0]


def load_recipes(path: str | os.PathLike, variables: Mapping[str, Any] | None = None) -> list[Recipe]:
    """The recipes a file means: itself, or one per combination of its `matrix:`."""
    path = Path(path)
    data, positions, file_dirs, files = _read_with_bases(path, chain=())
    _raise_if(_non_finite(data, positions))
    recipe_vars = data.pop("vars", {})
    if not isinstance(recipe_vars, dict):
        raise RecipeError([Problem(positions.value(("vars",)), "vars", "must be a mapping of name: value")])
    variables = dict(variables or {})
    _raise_if(_undeclared(variables, recipe_vars, positions, _display(path)))
    data.pop("extends", None)
    data, problems = render_templates(data, {**recipe_vars, **variables}, positions)
    _raise_if(problems or _non_finite(data, positions))
    origin = dict(path=path, file_dirs=file_dirs, files=files, variables=variables)
    if "matrix" not in data:
        return [_finish(data, positions, origin, variant=None)]
    recipes, problems = [], []
    for index, (variant_data, variant_positions) in enumerate(expand_matrix(data, positions)):
        try:
            recipes.append(_finish(variant_data, variant_positions, origin, variant=index))
        except RecipeError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise RecipeError(problems)
    return recipes


def _raise_if(problems: list[Problem]) -> None:
    if problems:
        raise RecipeError(problems)


def _non_finite(value: Any, positions: Positions, path: tuple = ()) -> list[Problem]:
    """NaN and ±infinity (YAML's .nan, .inf) anywhere: no recipe field means them, and they
    would pass the schema's number checks (every comparison with NaN is false) and fail later."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, positions, path + (k,))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, positions, path + (i,))]
    if isinstance(value, float) and not math.isfinite(value):
        return [Problem(positions.value(path), dotted(path),
                        f"{value} is not a finite number; give a real value")]
    return []


def _undeclared(variables: Mapping[str, Any], declared: dict, positions: Positions, file: str) -> list[Problem]:
    """--set names the recipe (with its bases) does not declare under `vars:`: a typo
    would otherwise be ignored, or fill a template the author never meant to be set."""
    where = positions.key(("vars",)) or Location(file)
    known = sorted(declared)
    problems = []
    for name in variables:
        if name in declared:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(Problem(where, "vars", f"--set {name}: the recipe declares no variable {name!r} ({hint}"
                                f"declared: {', '.join(known) or 'none'}); declare it under `vars:` or fix the name"))
    return problems


def _finish(data: dict, positions: Positions, origin: dict, variant: int | None) -> Recipe:
    problems = validate_against_schema(data, positions)
    if problems:
        raise RecipeError(problems)
    recipe = Recipe.create(origin["path"], data, positions, origin["file_dirs"], origin["files"],
                           variables=origin["variables"], variant=variant)
    findings = check_rules(recipe.data)
    if findings:
        raise RecipeError([Problem(recipe.location(field), field, message) for field, message in findings])
    return recipe


def _display(path: Path) -> str:
    """How a file is named in messages: relative to the current directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read_with_bases(path: Path, chain: tuple[Path, ...]):
    """The document at `path` deep-merged over the chain of bases it `extends`."""
    display = _display(path)
    data, positions = read_yaml(path, display)
    return _extend(path, display, data, positions, chain)


def _read_base(base_path: Path, where: Location, chain: tuple[Path, ...]):
    """A base recipe: a file that is not a mapping of recipe keys is refused without quoting it
    (`extends: /etc/passwd` must not print the file's lines as "unknown keys")."""
    display = _display(base_path)
    try:
        data, positions = read_yaml(base_path, display, top_keys=recipe_schema()["properties"].keys())
    except ForeignFile as exc:
        raise RecipeError([Problem(where, "extends", f"base recipe {display} is not a recipe file: {exc}; "
                                   "`extends` must name a recipe (a YAML mapping of recipe keys)")]) from None
    return _extend(base_path, display, data, positions, chain)


def _extend(path: Path, display: str, data: dict, positions: Positions, chain: tuple[Path, ...]):
    resolved = path.resolve()
    file_dirs = {display: resolved.parent}
    files: tuple[Path, ...] = (path,)
    base_ref = data.get("extends")
    if base_ref is None:
        return data, positions, file_dirs, files
    where = positions.value(("extends",)) or Location(display)
    if not isinstance(base_ref, str) or not base_ref:
        raise RecipeError([Problem(where, "extends", "must be the path of a base recipe, relative to this file")])
    base_path = resolved.parent / base_ref
    if base_path.resolve() in (*chain, resolved):
        cycle = " -> ".join(_display(p) for p in (*chain, resolved, base_path.resolve()))
        raise RecipeError([Problem(where, "extends", f"extends cycle: {cycle}; a base must not extend its descendants")])
    if not base_path.is_file():
        raise RecipeError([Problem(where, "extends", f"base recipe {_display(base_path)} not found (paths are relative to {display})")])
    base, base_positions, base_dirs, base_files = _read_base(base_path, where, (*chain, resolved))
    merged_positions = Positions()
    merged_positions.update(base_positions)
    merged = deep_merge(base, data, merged_positions, positions)
    merged_positions.values[()] = positions.values[()]  # the document itself is this file
    merged.pop("extends", None)
    return merged, merged_positions, {**base_dirs, **file_dirs}, files + base_files


def deep_merge(base: dict, override: dict, positions: Positions, override_positions: Positions,
               prefix: tuple = ()) -> dict:
    """Mappings merge key by key; lists and scalars in `override` replace the base's.

    `positions` starts as the base's and ends describing the merged document.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            positions.values[path] = override_positions.values[path]
            positions.keys[path] = override_positions.keys[path]
            out[key] = deep_merge(out[key], value, positions, override_positions, path)
            continue
        positions.drop_under(path)
        n = len(path)
        for table, source in ((positions.values, override_positions.values), (positions.keys, override_positions.keys)):
            table.update({p: loc for p, loc in source.items() if p[:n] == path})
        out[key] = copy.deepcopy(value)
    return out
