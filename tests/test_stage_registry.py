"""stages/registry.py is the one table of stages: everything the pipeline knows of a stage comes from it."""
from __future__ import annotations

import dataclasses

from recipe_runner.pipeline.keys import make_key
from recipe_runner.pipeline.plan import recipe_stages
from recipe_runner.recipe import load_recipes
from recipe_runner.stages import registry
from recipe_runner.stages.registry import PUBLISHED, STAGES, UNTIL_ALIASES, VERIFIED_STAGES, stage_executor
from recipe_runner.store.lock import LOCK_NAME
from recipe_runner.store.ownership import META
from tests.recipe_files import REPO


def test_every_planned_stage_of_every_shipped_recipe_has_a_spec_and_an_executor():
    planned = set()
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        for recipe in load_recipes(path, {}):
            planned |= {stage.name for stage in recipe_stages(recipe)}
    assert planned <= set(STAGES)
    assert {"convert", "shard", "verify", "build-engine", "export-hf-modelopt"} <= planned
    for name in STAGES:
        assert callable(stage_executor(name)), name


def test_published_folders_are_distinct_and_leave_room_for_the_lock_and_marker():
    folders = list(PUBLISHED.values())
    assert len(folders) == len(set(folders)) and not {LOCK_NAME, META} & set(folders)
    assert VERIFIED_STAGES == ("shard", "export-hf-modelopt", "export-hf-compressed-tensors")
    assert [STAGES[s].target for s in VERIFIED_STAGES] == ["trtllm-checkpoint", "hf-modelopt", "hf-compressed-tensors"]
    assert UNTIL_ALIASES == {"checkpoint": "shard", "engine": "build-engine"}


def test_a_stage_version_enters_its_key(monkeypatch):
    before = make_key("shard", {"tp_size": 2}, {"convert": "0" * 64}, {})
    monkeypatch.setitem(registry.STAGES, "shard", dataclasses.replace(STAGES["shard"], version=99))
    after = make_key("shard", {"tp_size": 2}, {"convert": "0" * 64}, {})
    assert before.digest != after.digest and after.material["version"] == 99
