"""Read YAML safely and remember where every key and value came from.

PyYAML's SafeLoader builds only plain types (so `!!python/object` tags fail),
and its composed node tree carries line/column marks. We construct the data
ourselves from that tree to record, for each dotted path, the location of the
value and of its key, and to reject duplicate keys, which YAML loaders
otherwise silently resolve to the last one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipe_runner.errors import Location, Problem, RecipeError

PathKey = tuple  # a path into the document: ("quantization", "algo") or ("verify", "prompts", 0)


@dataclass
class Positions:
    """Where each value (and each mapping key) of a document was written."""

    values: dict[PathKey, Location] = field(default_factory=dict)
    keys: dict[PathKey, Location] = field(default_factory=dict)

    def update(self, other: "Positions") -> None:
        self.values.update(other.values)
        self.keys.update(other.keys)

    def drop_under(self, prefix: PathKey) -> None:
        """Forget every position at or below `prefix` (its value was replaced)."""
        n = len(prefix)
        for table in (self.values, self.keys):
            for path in [p for p in table if p[:n] == prefix]:
                del table[path]

    def value(self, path: PathKey) -> Location | None:
        """Location of the value at `path`, or of the nearest ancestor that has one."""
        for i in range(len(path), -1, -1):
            loc = self.values.get(tuple(path[:i]))
            if loc is not None:
                return loc
        return None

    def key(self, path: PathKey) -> Location | None:
        return self.keys.get(tuple(path)) or self.value(path)


def _location(file: str, node: yaml.Node) -> Location:
    mark = node.start_mark
    return Location(file, mark.line + 1, mark.column + 1)


def _mark_location(file: str, mark: Any) -> Location:
    if mark is None:
        return Location(file)
    return Location(file, mark.line + 1, mark.column + 1)


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.positions = Positions()
        self.problems: list[Problem] = []
        self._scalars = yaml.SafeLoader("")  # only used for its safe scalar constructors

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        self.positions.values[path] = _location(self.file, node)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                self._fail(node, path, _tag_refused(node.tag))
                return []
            return [self.build(child, path + (i,)) for i, child in enumerate(node.value)]
        return self._scalar(node, path)

    def _scalar(self, node: yaml.ScalarNode, path: PathKey) -> Any:
        try:
            return self._scalars.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            self._fail(node, path, _constructor_message(node, exc))
            return None

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict:
        if node.tag != "tag:yaml.org,2002:map":
            self._fail(node, path, _tag_refused(node.tag))
            return {}
        result: dict = {}
        seen: dict[Any, Location] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._fail(key_node, path, "YAML merge keys (<<) are not supported; use `extends:` to share settings")
                continue
            key = self._scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self._fail(key_node, path, "mapping keys must be plain strings")
                continue
            key_loc = _location(self.file, key_node)
            if key in seen:
                first = seen[key]
                self.problems.append(
                    Problem(key_loc, _dotted(path + (key,)),
                            f"duplicate key {key!r} (first set at line {first.line}); keep only one")
                )
                continue
            seen[key] = key_loc
            self.positions.keys[path + (key,)] = key_loc
            result[key] = self.build(value_node, path + (key,))
        return result

    def _fail(self, node: yaml.Node, path: PathKey, message: str) -> None:
        self.problems.append(Problem(_location(self.file, node), _dotted(path), message))


def _tag_refused(tag: str) -> str:
    short = tag.replace("tag:yaml.org,2002:", "!!")
    return f"tag {short} is not allowed: recipes hold plain mappings, lists and scalars only"


def _constructor_message(node: yaml.Node, exc: yaml.constructor.ConstructorError) -> str:
    if "could not determine a constructor" in (exc.problem or ""):
        return _tag_refused(node.tag)
    return exc.problem or str(exc)


def _dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


dotted = _dotted


def read_yaml(path: Path, display_name: str) -> tuple[Any, Positions]:
    """Parse one YAML document; raise RecipeError listing every problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(Location(display_name), "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(Location(display_name), "", f"cannot read: {exc}")]) from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        loc = _mark_location(display_name, exc.problem_mark or exc.context_mark)
        raise RecipeError([Problem(loc, "", f"invalid YAML: {exc.problem or exc.context}")]) from None
    finally:
        loader.dispose()
    if root is None:
        raise RecipeError([Problem(Location(display_name, 1, 1), "", "the file is empty; a recipe is a YAML mapping")])
    builder = _Builder(display_name)
    data = builder.build(root, ())
    if builder.problems:
        raise RecipeError(builder.problems)
    if not isinstance(data, dict):
        raise RecipeError([Problem(_location(display_name, root), "", "a recipe must be a YAML mapping at the top level")])
    return data, builder.positions
