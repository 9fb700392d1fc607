"""The schema is the recipe format's reference (`recipe schema`): every field says what it does, and the
engine fields' descriptions agree with the trtllm-build options they are passed as."""
from __future__ import annotations

import re
from typing import Iterator

import pytest

from recipe_runner.recipe.schema import recipe_schema
from recipe_runner.trtllm.engine_options import ENGINE_FIELD_OPTIONS
from recipe_runner.trtllm.releases import newest, release_named


def _fields(node: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """(dotted path, schema) of every property at every depth: properties, the value schema of
    additionalProperties (`.*`), items (`[]`), $defs and the branches of anyOf / oneOf / allOf."""
    for name, sub in node.get("properties", {}).items():
        yield f"{path}.{name}".lstrip("."), sub
        yield from _fields(sub, f"{path}.{name}")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield f"{path}.*".lstrip("."), extra
        yield from _fields(extra, f"{path}.*")
    items = node.get("items")
    if isinstance(items, dict):
        yield f"{path}[]".lstrip("."), items
        yield from _fields(items, f"{path}[]")
    for name, sub in node.get("$defs", {}).items():
        yield f"$defs.{name}", sub
        yield from _fields(sub, f"$defs.{name}")
    for keyword in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(node.get(keyword, ())):
            yield from _fields(sub, f"{path}.{keyword}[{i}]")


FIELDS = dict(_fields(recipe_schema()))


def test_the_walk_reaches_every_depth():
    # nested objects, additionalProperties value schemas and items of items are all walked
    for path in ("mapping.tp_size", "quantization.calibration.seed", "verify.tolerances.mean_kl",
                 "vars.*", "matrix.*", "matrix.*[]", "engine.extra_args.*", "verify.token_ids[][]"):
        assert path in FIELDS
    # every engine field is a trtllm-build option, except strongly_typed and extra_args (with its value schema)
    assert {p for p in FIELDS if p.startswith("engine.")} == {
        *(f"engine.{f}" for f in ENGINE_FIELD_OPTIONS), "engine.strongly_typed", "engine.extra_args", "engine.extra_args.*"}


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_every_property_has_a_description(path):
    description = FIELDS[path].get("description")
    assert isinstance(description, str) and len(description.strip()) >= 20, f"{path} needs a description"


@pytest.mark.parametrize("path", sorted(p for p, s in FIELDS.items()
                                        if "default" in s and s.get("type") != "object" and "const" not in s))
def test_every_default_is_explained(path):
    assert "Default" in FIELDS[path]["description"], f"{path}: say what the default is (and why)"


def _trtllm_value(schema_default):
    """How trtllm-build's argparse spells a recipe value: booleans of enable/disable options."""
    return {True: "enable", False: "disable"}.get(schema_default, schema_default) if isinstance(
        schema_default, bool) else schema_default


@pytest.mark.parametrize("field", sorted(ENGINE_FIELD_OPTIONS))
def test_engine_descriptions_name_the_option_and_its_real_default(field):
    schema = FIELDS[f"engine.{field}"]
    description, option = schema["description"], ENGINE_FIELD_OPTIONS[field]
    assert f"--{option}" in description
    raw = {o["flag"].lstrip("-"): o for o in release_named(newest().name).build_options}[option]
    recorded = raw.get("default")
    if raw.get("action") == "store_true":
        recorded = bool(recorded)
    if "trtllm-build's default" in description:  # the recipe default is the newest release's own
        assert recorded in (schema["default"], _trtllm_value(schema["default"])), field
    own = re.search(r"trtllm-build's own default is (\w+)", description)
    if own:  # the recipe default differs, and the description says from what
        assert str(recorded) == own.group(1) and recorded not in (schema["default"], _trtllm_value(schema["default"]))
