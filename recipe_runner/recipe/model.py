"""The loaded recipe: normalized, frozen, and hashable in one canonical form."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from recipe_runner.errors import Location
from recipe_runner.recipe.schema import recipe_schema
from recipe_runner.recipe.yaml_positions import Positions

# Open mappings whose keys are names that get checked (trtllm-build options): a finding about an
# entry concerns its name, so it points at the `<name>:` key rather than at the value.
NAMED_ENTRIES = (("engine", "extra_args"),)


def fill_defaults(data: Any, schema: Mapping) -> Any:
    """Add schema defaults for absent keys and put keys in schema order.

    Numbers become canonical (`1` for an integer field, `1.0` for a number
    field, the enum's own value for enums), so that two recipes that mean the
    same thing serialize to the same JSON.
    """
    if isinstance(data, dict):
        props = schema.get("properties")
        if props is None:  # an open mapping (vars, extra_args): keep keys, sorted
            values = schema.get("additionalProperties")
            values = values if isinstance(values, dict) else {}
            return {k: fill_defaults(data[k], values) for k in sorted(data)}
        out: dict = {}
        for key, sub in props.items():
            if key in data:
                out[key] = fill_defaults(data[key], sub)
            elif "default" in sub:
                out[key] = fill_defaults(copy.deepcopy(sub["default"]), sub)
        return out
    if isinstance(data, list):
        items = schema.get("items", {})
        return [fill_defaults(v, items) for v in data]
    return _canonical_scalar(data, schema)


def _canonical_scalar(value: Any, schema: Mapping) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    for member in schema.get("enum", ()):
        if type(member) is not bool and member == value:
            return member
    kinds = _types(schema)
    if "number" in kinds and isinstance(value, (int, float)):
        return float(value)
    if "integer" in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _types(schema: Mapping) -> set[str]:
    """The field's one `type` (a list of types, as before, converts nothing) and those of its anyOf branches:
    a field of several forms (smoothquant_alpha: a number or "auto") keeps the canonical form of its
    numeric one."""
    return {k for k in (schema.get("type"), *(b.get("type") for b in schema.get("anyOf", ()))) if isinstance(k, str)}


def canonical_json(data: Any) -> str:
    """Sorted keys, no whitespace, no NaN: the byte string recipes are hashed by."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def freeze(value: Any) -> Any:
    """A deeply read-only view of JSON-like data (dicts → mapping proxies, lists → tuples)."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy (dicts and lists) of frozen recipe data."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Recipe:
    """A validated, normalized recipe. `data` is read-only; `canonical_json` is what gets hashed."""

    path: Path  # the recipe file as given
    data: Mapping[str, Any]
    positions: Positions
    file_dirs: Mapping[str, Path]  # display name of each file read → its directory
    files: tuple[Path, ...]  # the recipe file, then the bases it extends
    variables: Mapping[str, Any]  # the --set variables it was loaded with
    variant: int | None  # index of this recipe in its file's matrix, None without a matrix

    @classmethod
    def create(cls, path: Path, data: dict, positions: Positions, file_dirs: dict[str, Path],
               files: tuple[Path, ...], variables: Mapping[str, Any] | None = None,
               variant: int | None = None) -> "Recipe":
        normalized = fill_defaults(data, recipe_schema())
        normalized.setdefault("output", {}).setdefault("dir", f"build/{normalized['name']}")
        return cls(path, freeze(normalized), positions, MappingProxyType(dict(file_dirs)), files,
                   MappingProxyType(dict(variables or {})), variant)

    @property
    def name(self) -> str:
        return self.data["name"]

    def to_dict(self) -> dict:
        return thaw(self.data)

    def canonical_json(self) -> str:
        return canonical_json(self.to_dict())

    def canonical_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def has(self, dotted: str) -> bool:
        sentinel = object()
        return self.get(dotted, sentinel) is not sentinel

    def location(self, dotted: str) -> Location:
        """Where `dotted` (or its nearest written ancestor) was set; the recipe file if nowhere. An entry
        of an open mapping whose names are checked (engine.extra_args.<name>) is located at its key."""
        path = tuple(dotted.split("."))
        if path[:-1] in NAMED_ENTRIES:
            return self.positions.key(path) or Location(str(self.path))
        return self.positions.value(path) or Location(str(self.path))

    def resolve_path(self, dotted: str) -> Path | None:
        """A path-valued field as an absolute path: relative to the file that set it,
        or to the current directory for defaults (e.g. output.dir = build/<name>)."""
        value = self.get(dotted)
        if value is None:
            return None
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        loc = self.positions.values.get(tuple(dotted.split(".")))
        base = self.file_dirs.get(loc.file) if loc else None
        return ((base or Path.cwd()) / path).resolve()
