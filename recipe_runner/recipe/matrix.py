"""`matrix:`: one reviewed file that means several recipes, one per combination of values.

    matrix:
      mapping.tp_size: [1, 2, 4]
      quantization.algo: [none, w8a16]

gives six recipes named `<name>-tp1-none`, `<name>-tp1-w8a16`, ... Each value is located at its
place in the matrix, so a bad combination is reported there. Variants publish to
`build/<variant name>` (or `<output.dir>/<variant name>` when the file sets output.dir).
"""
from __future__ import annotations

import copy
import difflib
import itertools
from typing import Any, Iterator

from recipe_runner.errors import Problem, RecipeError
from recipe_runner.recipe.schema import recipe_schema
from recipe_runner.recipe.yaml_positions import Positions

NOT_VARIABLE = {"recipe_version", "name", "description", "extends", "vars", "matrix", "output"}
# How a variant's name spells each varied field: tp_size 2 → "tp2", algo w8a16 → "w8a16".
_NAME_PREFIX = {"tp_size": "tp", "pp_size": "pp", "algo": "", "kv_cache": "kv-"}


def _field_paths(schema: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths += _field_paths(sub, f"{path}.") if "properties" in sub else [path]
    return paths


def _check_matrix(matrix: Any, positions: Positions) -> list[Problem]:
    if not isinstance(matrix, dict) or not matrix:
        return [Problem(positions.value(("matrix",)), "matrix", "must map recipe fields to lists of values, "
                        "e.g. {mapping.tp_size: [1, 2]}")]
    fields = [p for p in _field_paths(recipe_schema()) if p.split(".")[0] not in NOT_VARIABLE]
    problems = []
    for key, values in matrix.items():
        where = positions.key(("matrix", key))
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "give a dotted field path such as mapping.tp_size"
            problems.append(Problem(where, f"matrix.{key}", f"{key!r} is not a recipe field that can vary ({hint})"))
        elif not isinstance(values, list) or not values or len(set(map(repr, values))) != len(values):
            problems.append(Problem(positions.value(("matrix", key)), f"matrix.{key}",
                                    "must be a non-empty list of distinct values"))
    return problems


def _suffix(key: str, value: Any) -> str:
    leaf = key.split(".")[-1]
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{_NAME_PREFIX[leaf]}{text}" if leaf in _NAME_PREFIX else f"{leaf}-{text}"


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = copy.deepcopy(value)


def expand_matrix(data: dict, positions: Positions) -> Iterator[tuple[dict, Positions]]:
    """(data, positions) of each variant, in the order the matrix lists its values."""
    matrix = data["matrix"]
    problems = _check_matrix(matrix, positions)
    if problems:
        raise RecipeError(problems)
    keys = list(matrix)
    base = {k: v for k, v in data.items() if k != "matrix"}
    for choice in itertools.product(*(range(len(matrix[k])) for k in keys)):
        variant, variant_positions = copy.deepcopy(base), copy.deepcopy(positions)
        for key, index in zip(keys, choice):
            path = tuple(key.split("."))
            _set(variant, key, matrix[key][index])
            variant_positions.drop_under(path)
            variant_positions.values[path] = positions.value(("matrix", key, index))
        suffix = "-".join(_suffix(k, matrix[k][i]) for k, i in zip(keys, choice))
        variant["name"] = f"{base.get('name', 'recipe')}-{suffix}"
        if isinstance(variant.get("output"), dict) and "dir" in variant["output"]:
            variant["output"]["dir"] = f"{variant['output']['dir']}/{variant['name']}"
        yield variant, variant_positions
