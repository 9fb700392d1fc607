"""The recipe JSON Schema: loading it, and turning its findings into located problems."""
from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from recipe_runner.errors import Problem
from recipe_runner.recipe.yaml_positions import Positions, dotted

SCHEMA_NAME = "recipe.v1.schema.json"


def schema_path() -> Path:
    """Where the schema file lives (package data; a link to schema/ in a source checkout)."""
    return Path(str(resources.files("recipe_runner") / "data" / SCHEMA_NAME)).resolve()


@lru_cache(maxsize=1)
def recipe_schema() -> dict:
    return json.loads(schema_path().read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    schema = recipe_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def subschema(path: tuple) -> dict:
    """The schema of the object at `path` (mapping keys only), {} if unknown."""
    node = recipe_schema()
    for key in path:
        node = node.get("properties", {}).get(key, {})
    return node


def validate_against_schema(data: Any, positions: Positions) -> list[Problem]:
    problems: list[Problem] = []
    for error in _validator().iter_errors(data):
        problems.extend(_problems_of(error, positions))
    problems.sort(key=lambda p: (p.location.file, p.location.line or 0, p.location.col or 0, p.message))
    return problems


def _problems_of(error: ValidationError, positions: Positions) -> list[Problem]:
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        if allowed:  # a closed mapping: name each unknown key, with a suggestion
            extra = [k for k in error.instance if k not in allowed]
            return [_unknown_key(path, key, allowed, positions) for key in extra]
        # open mapping whose values have a schema: let the nested errors speak
        return [_value_problem(e, positions) for e in error.context] or [
            Problem(positions.value(path), dotted(path), error.message)
        ]
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        hint = subschema(path + (missing,)).get("description", "")
        text = f"missing required key {missing!r}" + (f" ({hint})" if hint else "")
        return [Problem(positions.value(path), dotted(path), text)]
    return [_value_problem(error, positions)]


def _value_problem(error: ValidationError, positions: Positions) -> Problem:
    path = tuple(error.absolute_path)
    message = error.message
    if error.validator == "const":
        message = f"{error.instance!r} is not allowed; it must be {error.validator_value!r}"
    elif error.validator == "pattern":
        message = f"{error.instance!r} is not a valid value (must match {error.validator_value})"
    elif error.validator == "anyOf":  # jsonschema says only "not valid under any of the given schemas"
        message = f"{error.instance!r} is not allowed; it must be " + " or ".join(map(_form, error.validator_value))
    return Problem(positions.value(path), dotted(path), message)


def _form(branch: dict) -> str:
    """One branch of an anyOf, as a message names it: "a number from 0 to 1", "'auto'"."""
    if "const" in branch:
        return repr(branch["const"])
    bounds = f" from {branch['minimum']} to {branch['maximum']}" if {"minimum", "maximum"} <= set(branch) else ""
    return f"a {branch.get('type', 'value')}{bounds}"


def _unknown_key(path: tuple, key: str, allowed: list[str], positions: Positions) -> Problem:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"
    where = dotted(path) or "the top level"
    return Problem(positions.key(path + (key,)), dotted(path + (key,)), f"unknown key {key!r} in {where} ({hint})")
