"""The TensorRT-LLM releases recipe-runner writes checkpoints and trtllm-build arguments for.

Facts per release are package data (recipe_runner/data/trtllm/<release>.json), generated from
TensorRT-LLM's own source at each release tag by scripts/trtllm_release_facts.py (each file names
its tag, commit and source repository): QuantConfig's fields, the QuantAlgo values and KV-cache
algos, Mapping's parameters and trtllm-build's options. A recipe's `tensorrt_llm` field picks the
release; unset, it is the newest recorded one (or, when the recipe builds an engine, the installed
trtllm-build's). Data only: no torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from recipe_runner.errors import UserError

FIELD = "tensorrt_llm"  # the recipe field that names the target release


@dataclass(frozen=True)
class Release:
    name: str  # "0.14"
    version: str  # "0.14.0"
    tag: str
    commit: str
    source_repo: str
    quant_config: dict[str, Any]  # QuantConfig field → default, in declaration order (unknown keys: TypeError)
    quant_algos: frozenset[str]  # QuantAlgo values
    kv_cache_quant_algos: frozenset[str]
    mapping_parameters: frozenset[str]  # Mapping.__init__'s parameters (unknown keys: TypeError)
    build_options: tuple[dict[str, Any], ...]  # trtllm-build's argparse options as recorded

    def describe(self) -> str:
        return f"TensorRT-LLM {self.name} ({self.tag} @ {self.commit[:12]}, read from {self.source_repo})"


def _data(name: str) -> Any:
    return json.loads((resources.files("recipe_runner") / "data" / "trtllm" / name).read_text("utf-8"))


def _release(entry: dict[str, Any]) -> Release:
    facts = _data(entry["file"])
    return Release(
        name=entry["release"], version=entry["version"], tag=entry["tag"], commit=entry["commit"],
        source_repo=entry["source_repo"],
        quant_config={f["name"]: f["default_value"] for f in facts["quant_config"]["fields"]},
        quant_algos=frozenset(facts["quant_algos"]),
        kv_cache_quant_algos=frozenset(facts["kv_cache_quant_algos"]),
        mapping_parameters=frozenset(p["name"] for p in facts["mapping"]["parameters"]),
        build_options=tuple(facts["trtllm_build_options"]),
    )


@lru_cache(maxsize=1)
def releases() -> dict[str, Release]:
    """Every recorded release by name, oldest first."""
    return {entry["release"]: _release(entry) for entry in _data("releases.json")["releases"]}


def newest() -> Release:
    return list(releases().values())[-1]


def recorded_names() -> str:
    return ", ".join(releases())


def unrecorded(name: str) -> str:
    """Why a release named in a recipe cannot be targeted, and what to do."""
    return (f"{name!r} is not a recorded TensorRT-LLM release (recorded: {recorded_names()}); "
            "record it with scripts/trtllm_release_facts.py (recipe_runner/data/trtllm/README.md)")


def release_named(name: str | None) -> Release:
    """The recipe's target release; None: the newest recorded."""
    if name is None:
        return newest()
    if name not in releases():
        raise UserError(f"{FIELD}: {unrecorded(name)}")
    return releases()[name]


def release_of_version(version: str) -> str:
    """"0.14" from an installed version "0.14.0", "0.14.0.dev2024092400" or "1.2.0rc1"."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{int(match.group(1))}.{int(match.group(2))}" if match else version


def having(predicate) -> list[str]:
    """The recorded releases for which predicate(release) holds, oldest first."""
    return [name for name, release in releases().items() if predicate(release)]


def listed(names: list[str]) -> str:
    return ", ".join(names) if names else "none of the recorded releases"
