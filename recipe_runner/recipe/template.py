"""`{{ variable }}` substitution in recipe strings, in Jinja2's sandbox.

Only string values are rendered (keys are not), so every value keeps its YAML
position. A value that is a single `{{ ... }}` expression takes the YAML type
of what it renders to, so `tp_size: "{{ tp }}"` becomes the integer 4.
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from recipe_runner.errors import Problem
from recipe_runner.recipe.yaml_positions import PathKey, Positions, dotted

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?:(?!\}\}).)*\}\}\s*$", re.S)
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def parse_set_option(text: str) -> tuple[str, Any]:
    """`name=value` from the command line; the value is read as a YAML scalar."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"--set expects name=value with a variable name, got {text!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if not isinstance(value, (str, int, float, bool)) and value is not None:
        value = raw  # lists/maps on the command line stay literal strings
    return name, value


def render_templates(data: Any, variables: dict[str, Any], positions: Positions) -> tuple[Any, list[Problem]]:
    """Render every templated string in `data`; returns the new data and the problems found."""
    problems: list[Problem] = []

    def walk(node: Any, path: PathKey) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, path + (i,)) for i, v in enumerate(node)]
        if isinstance(node, str) and ("{{" in node or "{%" in node or "{#" in node):
            try:
                return _render(node, variables)
            except Exception as exc:  # each template error becomes a located problem
                problems.append(Problem(positions.value(path), dotted(path), _explain(exc, variables)))
                return node
        return node

    return walk(data, ()), problems


def _render(text: str, variables: dict[str, Any]) -> Any:
    rendered = _ENV.from_string(text).render(**variables)
    if _SINGLE_EXPRESSION.match(text):
        typed = yaml.safe_load(rendered) if rendered.strip() else rendered
        if isinstance(typed, (int, float, bool)) or typed is None:
            return typed
    return rendered


def _explain(exc: Exception, variables: dict[str, Any]) -> str:
    if isinstance(exc, UndefinedError):
        match = re.search(r"'([^']+)' is undefined", str(exc))
        if match:
            name = match.group(1)
            known = ", ".join(sorted(variables)) or "none"
            return (f"undefined variable {name!r}: define it under `vars:` or pass --set {name}=VALUE "
                    f"(defined: {known})")
        return f"undefined value in template: {exc}"
    if isinstance(exc, SecurityError):
        return f"template refused by the sandbox: {exc}"
    if isinstance(exc, TemplateError):
        return f"template error: {exc}"
    return f"template error: {type(exc).__name__}: {exc}"
