"""Plan + cache → the key and status of every stage, and why a stage must run.

Keys need the source files' sha256 (memoized by path, size, mtime and inode, so
a warm plan of a 140 GB model costs stat calls). Upstream stages enter a key by
their own key, which stands for their deterministic output; so every key is
known before anything runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from recipe_runner.calibration.dataset import cached_dataset_files
from recipe_runner.errors import SourceModelError
from recipe_runner.hf.files import tokenizer_files, weight_files
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.fsutil import atomic_write_text
from recipe_runner.store.hashing import FileDigest
from recipe_runner.pipeline.keys import CacheKey, digest_of_files, explain_change, make_key
from recipe_runner.store.lock import tool_versions
from recipe_runner.pipeline.plan import Plan, Stage
from recipe_runner.hf.sources import require_source
from recipe_runner.trtllm.toolchain import Toolchain

# Tools whose versions enter every key; the engine stage adds TensorRT-LLM and the GPU.
KEY_TOOLS = ("recipe_runner", "safetensors", "torch", "transformers")


@dataclass(frozen=True)
class StageStatus:
    stage: Stage
    key: CacheKey
    cached: bool
    reasons: tuple[str, ...]  # why it must run (empty when cached)


@dataclass(frozen=True)
class ResolvedPlan:
    plan: Plan
    source_dir: Path
    sources: Mapping[str, FileDigest]  # relpath in the source dir → size, sha256
    statuses: tuple[StageStatus, ...]
    toolchain: Toolchain | None = None  # trtllm-build, when the plan builds an engine here

    def status(self, name: str) -> StageStatus:
        return next(s for s in self.statuses if s.stage.name == name)


def source_files(model_dir: Path) -> list[Path]:
    """The files conversion reads: config.json, the weight index if any, the weight files."""
    weights = weight_files(model_dir)
    if not weights:
        from recipe_runner.hf.reader import SourceCheckpoint  # torch: kept off the warm path

        SourceCheckpoint(model_dir)  # raises the reader's explanation of what is missing
        raise SourceModelError(f"{model_dir}: no weight files found")
    config = model_dir / "config.json"
    return sorted({*weights, *([config] if config.is_file() else [])})


def calibration_digest(plan: Plan, store: CacheStore, rehash: bool) -> str:
    """A local calibration file enters keys by content; a dataset id by name (its cache is read-only)."""
    path = plan.recipe.resolve_path("quantization.calibration.dataset")
    if path is not None and path.is_file():
        return store.hash_memo().hash_file(path, rehash=rehash)
    value = plan.recipe.get("quantization.calibration.dataset")
    found = cached_dataset_files(value)  # a snapshot in the local HF cache enters by its files' content
    if found is not None:
        files = store.hash_memo().hash_files(list(found.files), rehash=rehash, root=found.root)
        return digest_of_files({n: d.to_dict() for n, d in files.items()})
    return "dataset-id:" + value


def tokenizer_digest(model_dir: Path, store: CacheStore, rehash: bool) -> str:
    """The source's tokenizer files, which "source" (what conversion reads) leaves out."""
    files = store.hash_memo().hash_files(tokenizer_files(model_dir), rehash=rehash, root=model_dir)
    return digest_of_files({n: d.to_dict() for n, d in files.items()})


def key_tools() -> dict[str, str]:
    versions = tool_versions()
    return {name: versions[name] for name in KEY_TOOLS}


def resolve(plan: Plan, store: CacheStore, *, rehash: bool = False, toolchain: Toolchain | None = None) -> ResolvedPlan:
    source_dir = require_source(plan.recipe)
    sources = store.hash_memo().hash_files(source_files(source_dir), rehash=rehash, root=source_dir)
    inputs_by_name = {"source": digest_of_files({n: d.to_dict() for n, d in sources.items()})}
    if any("calibration-data" in s.inputs for s in plan.stages):
        inputs_by_name["calibration-data"] = calibration_digest(plan, store, rehash)
    if any("tokenizer" in s.inputs for s in plan.stages):
        inputs_by_name["tokenizer"] = tokenizer_digest(source_dir, store, rehash)
    previous = read_record(store, plan.recipe.name)
    tools = key_tools()
    statuses = []
    for stage in plan.stages:
        inputs = {name: inputs_by_name[name] for name in stage.inputs}
        stage_tools = tools
        if stage.name == "build-engine":  # engines depend on the TensorRT-LLM release and the GPU model
            stage_tools = {**tools, **(toolchain.key_material() if toolchain else {"tensorrt_llm": "unavailable"})}
        key = make_key(stage.name, stage.params, inputs, stage_tools)
        inputs_by_name[stage.name] = key.digest
        cached = store.get(key.digest) is not None
        reasons = () if cached else tuple(explain_change(previous.get(stage.name), key.material))
        if stage.name == "build-engine" and toolchain is None:
            cached, reasons = False, ("trtllm-build is not available here",)
        statuses.append(StageStatus(stage, key, cached, reasons))
    return ResolvedPlan(plan, source_dir, sources, tuple(statuses), toolchain)


# The last build of each recipe (by name), to explain later key changes.
def _record_path(store: CacheStore, recipe_name: str) -> Path:
    return store.root / "records" / f"{recipe_name}.json"


def read_record(store: CacheStore, recipe_name: str) -> dict[str, Any]:
    try:
        return json.loads(_record_path(store, recipe_name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_record(store: CacheStore, resolved: ResolvedPlan) -> None:
    path = _record_path(store, resolved.plan.recipe.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**read_record(store, resolved.plan.recipe.name),
              **{s.stage.name: s.key.material for s in resolved.statuses}}
    atomic_write_text(path, json.dumps(record, sort_keys=True, indent=1) + "\n")
