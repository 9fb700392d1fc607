"""Read YAML safely and remember where every key and value came from.

PyYAML's SafeLoader builds only plain types (so `!!python/object` tags fail),
and its composed node tree carries line/column marks. We construct the data
ourselves from that tree to record, for each dotted path, the location of the
value and of its key, and to reject duplicate keys, which YAML loaders
otherwise silently resolve to the last one.

The input is untrusted: the file's size, the values built (aliases expand into
copies, so a "billion laughs" bomb is counted as what it means) and the nesting
depth (PyYAML's composer recurses) are bounded by `recipe.limits`, and every
refusal is a located problem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

import yaml

from recipe_runner.errors import Location, Problem, RecipeError
from recipe_runner.recipe.limits import MAX_FILE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES

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


class _LimitExceeded(Exception):
    """A bound of `recipe.limits` was hit; parsing stops at once (going on is the danger)."""

    def __init__(self, location: Location, path: PathKey, message: str):
        super().__init__(message)
        self.problem = Problem(location, _dotted(path[:1]), message)


class ForeignFile(Exception):
    """A file read as a base recipe does not look like one; the reason quotes none of its content."""


_DEPTH_MESSAGE = (f"nesting deeper than the limit of {MAX_YAML_DEPTH} levels of mappings and lists; "
                  "flatten the recipe")
_NODES_MESSAGE = (f"more than the limit of {MAX_YAML_NODES} values, counting every copy an alias (*name) "
                  "expands to; write the values out or use fewer aliases")


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses deep nesting before Python's recursion limit does."""

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self._file = file
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _LimitExceeded(_mark_location(self._file, self.peek_event().start_mark), (), _DEPTH_MESSAGE)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.positions = Positions()
        self.problems: list[Problem] = []
        self._scalars = yaml.SafeLoader("")  # only used for its safe scalar constructors
        self._built = 0
        self._locations: dict[int, Location] = {}  # id(node) -> where it is; nodes live as long as the build

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        self._built += 1
        loc = self._locations.get(id(node))  # an aliased node is met many times
        if loc is None:
            loc = self._locations[id(node)] = _location(self.file, node)
        if self._built > MAX_YAML_NODES:
            raise _LimitExceeded(loc, path, _NODES_MESSAGE)
        if len(path) >= MAX_YAML_DEPTH:  # an alias can nest a node inside itself
            raise _LimitExceeded(loc, path, _DEPTH_MESSAGE)
        self.positions.values[path] = loc
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


def read_yaml(path: Path, display_name: str,
              top_keys: Collection[str] | None = None) -> tuple[Any, Positions]:
    """Parse one YAML document; raise RecipeError listing every problem found.

    With `top_keys` (reading a base recipe), a file that is not a mapping of those keys
    raises ForeignFile instead: its content is not the user's recipe, so no message quotes it.
    """
    foreign = top_keys is not None
    text = _read_text(path, display_name, foreign)
    root = _compose(text, display_name, foreign)
    if root is None:
        if foreign:
            raise ForeignFile("it is empty")
        raise RecipeError([Problem(Location(display_name, 1, 1), "", "the file is empty; a recipe is a YAML mapping")])
    if foreign and not isinstance(root, yaml.MappingNode):
        raise ForeignFile("it does not parse as a YAML mapping")
    if foreign and not all(isinstance(k, yaml.ScalarNode) and k.value in top_keys for k, _ in root.value):
        raise ForeignFile("its top level has keys that no recipe has")
    builder = _Builder(display_name)
    try:
        data = builder.build(root, ())
    except _LimitExceeded as exc:
        raise RecipeError([exc.problem]) from None
    if builder.problems:
        raise RecipeError(builder.problems)
    if not isinstance(data, dict):
        raise RecipeError([Problem(_location(display_name, root), "", "a recipe must be a YAML mapping at the top level")])
    return data, builder.positions


def _read_text(path: Path, display_name: str, foreign: bool) -> str:
    """The file as text, at most MAX_FILE_BYTES, refusing bytes that are not UTF-8 (located)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError([Problem(Location(display_name), "", "file not found")]) from None
    except OSError as exc:
        raise RecipeError([Problem(Location(display_name), "", f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        if foreign:
            raise ForeignFile(f"it is larger than {MAX_FILE_BYTES} bytes")
        raise RecipeError([Problem(Location(display_name), "", f"the file is larger than the limit of "
                                   f"{MAX_FILE_BYTES} bytes; a recipe is a small YAML file")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        column = len(raw[line_start:exc.start].decode("utf-8", "replace")) + 1
        loc = Location(display_name, raw.count(b"\n", 0, exc.start) + 1, column)
        if foreign:
            raise ForeignFile(f"it is not UTF-8 text (at {loc})") from None
        raise RecipeError([Problem(loc, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                                   "save the recipe as UTF-8")]) from None


def _compose(text: str, display_name: str, foreign: bool) -> yaml.Node | None:
    """The YAML node tree of `text`; every parse failure becomes one located problem."""
    loader = None
    try:
        loader = _Loader(text, display_name)  # the reader checks for unprintable characters here
        return loader.get_single_node()
    except _LimitExceeded as exc:
        raise RecipeError([exc.problem]) from None
    except yaml.reader.ReaderError as exc:
        loc = _offset_location(display_name, text, exc.position)
        problem = f"invalid YAML: character #x{exc.character:04x} is not allowed in YAML text; remove it"
        _refuse(loc, problem if isinstance(exc.character, int) else f"invalid YAML: {exc.reason}", foreign)
    except yaml.MarkedYAMLError as exc:
        loc = _mark_location(display_name, exc.problem_mark or exc.context_mark)
        _refuse(loc, f"invalid YAML: {exc.problem or exc.context}", foreign)
    except (yaml.YAMLError, RecursionError) as exc:  # no mark: say where the reader had got to
        mark = loader.get_mark() if loader is not None else None
        _refuse(_mark_location(display_name, mark), f"invalid YAML: {exc}", foreign)
    finally:
        if loader is not None:
            loader.dispose()
    raise AssertionError("unreachable")


def _refuse(loc: Location, message: str, foreign: bool) -> None:
    if foreign:  # the parser's message may quote the file's characters
        raise ForeignFile(f"it is not valid YAML (at {loc})") from None
    raise RecipeError([Problem(loc, "", message)]) from None


def _offset_location(file: str, text: str, offset: int) -> Location:
    line_start = text.rfind("\n", 0, offset) + 1
    return Location(file, text.count("\n", 0, offset) + 1, offset - line_start + 1)
