"""`{{ variable }}` substitution in recipe strings, in a bounded Jinja2 sandbox.

Only string values are rendered (keys are not), so every value keeps its YAML
position. A value that is a single `{{ ... }}` expression takes the YAML type
of what it renders to, so `tp_size: "{{ tp }}"` becomes the integer 4.

The sandbox that bounds what a template may cost is recipe_runner.recipe.sandbox; this module
walks a recipe's values, renders their strings there, types single expressions and explains
what fails. `parse_set_option` reads `--set name=value`.
"""
from __future__ import annotations

import math
import re
from typing import Any

import yaml
from jinja2 import TemplateError, UndefinedError
from jinja2.exceptions import SecurityError

from recipe_runner.errors import Problem
from recipe_runner.recipe.sandbox import TemplateLimitError, TemplateTimeout, render, time_budget
from recipe_runner.recipe.yaml_positions import PathKey, Positions, dotted

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?:(?!\}\}).)*\}\}\s*$", re.S)
_TYPED_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"}


# ---- --set -----------------------------------------------------------------------------------


def parse_set_option(text: str) -> tuple[str, Any]:
    """`name=value` from the command line; the value must be a YAML scalar (string, number, bool, null).

    A list or mapping is refused rather than passed on as text: `--set x=[1,2]` meaning the string
    "[1,2]" or a list is ambiguous, and a template cannot tell. Quote the value to pass it as a string.
    """
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"--set expects name=value with a variable name, got {text!r}")
    if not raw.strip():
        return name, ""
    quote_hint = f"to pass it as a string, quote it: --set '{name}=\"...\"'"
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--set {name}: the value is not valid YAML ({problem}); {quote_hint}") from None
    if isinstance(value, (list, dict)):
        raise ValueError(f"--set {name}: the value must be a single string, number or true/false, "
                         f"not a YAML {'list' if isinstance(value, list) else 'mapping'}; {quote_hint}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--set {name}: {raw.strip()} is not a finite number")
    if not isinstance(value, (str, int, float, bool)) and value is not None:
        value = raw  # other YAML scalars (dates, binary) stay the text given
    return name, value


# ---- rendering -------------------------------------------------------------------------------


def render_templates(data: Any, variables: dict[str, Any], positions: Positions) -> tuple[Any, list[Problem]]:
    """Render every templated string in `data`; returns the new data and the problems found.

    All of a file's templates share one time budget; once it is spent the rest are left
    unrendered, so the timeout is reported once.
    """
    problems: list[Problem] = []
    timed_out = False

    def walk(node: Any, path: PathKey) -> Any:
        nonlocal timed_out
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, path + (i,)) for i, v in enumerate(node)]
        if isinstance(node, str) and not timed_out and ("{{" in node or "{%" in node or "{#" in node):
            try:
                return _render(node, variables)
            except Exception as exc:  # each template error becomes a located problem
                timed_out = isinstance(exc, TemplateTimeout)
                problems.append(Problem(positions.value(path), dotted(path), _explain(exc, variables)))
                return node
        return node

    with time_budget():
        return walk(data, ()), problems


def _render(text: str, variables: dict[str, Any]) -> Any:
    rendered = render(text, variables)
    if _SINGLE_EXPRESSION.match(text):
        return _typed_scalar(rendered)
    return rendered


def _typed_scalar(rendered: str) -> Any:
    """The int, float, bool or null a rendered `{{ }}` spells as a plain YAML scalar, else the text.

    Resolved by YAML's scalar rules only: parsing the text as a document would let a template
    build nested structures (and recurse) just to be thrown away.
    """
    plain = rendered.strip()
    if not plain:
        return rendered
    loader = yaml.SafeLoader("")
    tag = loader.resolve(yaml.ScalarNode, plain, (True, False))
    return loader.construct_object(yaml.ScalarNode(tag, plain)) if tag in _TYPED_TAGS else rendered


def _explain(exc: Exception, variables: dict[str, Any]) -> str:
    if isinstance(exc, UndefinedError):
        match = re.search(r"'([^']+)' is undefined", str(exc))
        if match:
            name = match.group(1)
            known = ", ".join(sorted(variables)) or "none"
            return (f"undefined variable {name!r}: define it under `vars:` or pass --set {name}=VALUE "
                    f"(defined: {known})")
        return f"undefined value in template: {exc}"
    if isinstance(exc, TemplateLimitError):
        return f"template refused: {exc}"
    if isinstance(exc, SecurityError):
        return f"template refused by the sandbox: {exc}"
    if isinstance(exc, OverflowError):  # range() above the sandbox's MAX_RANGE, float overflow
        return f"template refused: {exc}" if isinstance(exc.args[0], str) else "template refused: a number is out of range"
    if isinstance(exc, RecursionError):
        return "template refused: it nests or recurses too deeply"
    if isinstance(exc, TemplateError):
        return f"template error: {_one_line(exc)}"
    return f"template error: {type(exc).__name__}: {_one_line(exc)}"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
