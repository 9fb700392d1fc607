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
from typing import Any, Iterable, Mapping

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
class InputFiles:
    """The files one input of the keys stands for, as the lock lists them; for a dataset (calibration's,
    verify's), the dataset as the recipe names it and, from the local HF cache, the snapshot (commit) used."""

    digest: str  # what enters the keys
    files: Mapping[str, FileDigest]  # relpath → size, sha256
    dataset: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class ResolvedPlan:
    plan: Plan
    source_dir: Path
    sources: Mapping[str, FileDigest]  # relpath in the source dir → size, sha256
    statuses: tuple[StageStatus, ...]
    toolchain: Toolchain | None = None  # trtllm-build, when the plan builds an engine here
    calibration: InputFiles | None = None  # when a stage reads calibration-data
    tokenizer: InputFiles | None = None  # when a stage reads the tokenizer
    verify_data: InputFiles | None = None  # when verify measures perplexity on a dataset (verify-data)

    def status(self, name: str) -> StageStatus:
        return next(s for s in self.statuses if s.stage.name == name)

    def input_files(self) -> dict[str, InputFiles]:
        """Every input of the keys that stands for files, by the name the keys give it."""
        found = {"source": InputFiles(_files_digest(self.sources), self.sources),
                 "calibration-data": self.calibration, "tokenizer": self.tokenizer, "verify-data": self.verify_data}
        return {name: files for name, files in found.items() if files is not None}


def _files_digest(files: Mapping[str, FileDigest]) -> str:
    return digest_of_files({n: d.to_dict() for n, d in files.items()})


def source_files(model_dir: Path) -> list[Path]:
    """The files conversion reads: config.json, the weight index if any, the weight files."""
    weights = weight_files(model_dir)
    if not weights:
        from recipe_runner.hf.reader import SourceCheckpoint  # torch: kept off the warm path

        SourceCheckpoint(model_dir)  # raises the reader's explanation of what is missing
        raise SourceModelError(f"{model_dir}: no weight files found")
    config = model_dir / "config.json"
    return sorted({*weights, *([config] if config.is_file() else [])})


# The stage inputs that stand for a dataset (a local file or a dataset id in the HF cache), by the
# recipe section naming it: calibration's statistics, verify's held-out perplexity text.
DATASET_INPUTS = {"calibration-data": "quantization.calibration", "verify-data": "verify.perplexity"}


def dataset_input(plan: Plan, store: CacheStore, rehash: bool, section: str) -> InputFiles:
    """A local dataset file enters keys by content; a dataset snapshot in the local HF cache by its
    files' content (`revision` selects it, else refs/main); a dataset id not found here by name.
    `section` is the recipe section holding dataset and revision (DATASET_INPUTS)."""
    dataset = plan.recipe.get(f"{section}.dataset")
    path = plan.recipe.resolve_path(f"{section}.dataset")
    if path is not None and path.is_file():
        digest = store.hash_memo().digest(path, rehash=rehash)
        return InputFiles(digest.sha256, {path.name: digest}, dataset)
    revision = plan.recipe.get(f"{section}.revision")
    found = cached_dataset_files(dataset, revision)
    if found is not None:
        files = store.hash_memo().hash_files(list(found.files), rehash=rehash, root=found.root)
        return InputFiles(_files_digest(files), files, dataset, found.revision)
    return InputFiles("dataset-id:" + dataset, {}, dataset, revision)


def tokenizer_input(model_dir: Path, store: CacheStore, rehash: bool) -> InputFiles:
    """The source's tokenizer files, which "source" (what conversion reads) leaves out."""
    files = store.hash_memo().hash_files(tokenizer_files(model_dir), rehash=rehash, root=model_dir)
    return InputFiles(_files_digest(files), files)


def key_tools() -> dict[str, str]:
    versions = tool_versions()
    return {name: versions[name] for name in KEY_TOOLS}


def resolve(plan: Plan, store: CacheStore, *, rehash: bool = False, toolchain: Toolchain | None = None) -> ResolvedPlan:
    source_dir = require_source(plan.recipe)
    sources = store.hash_memo().hash_files(source_files(source_dir), rehash=rehash, root=source_dir)
    source = InputFiles(_files_digest(sources), sources)
    inputs_by_name = {"source": source.digest}
    datasets: dict[str, InputFiles] = {}
    for name, section in DATASET_INPUTS.items():
        if any(name in s.inputs for s in plan.stages):
            datasets[name] = dataset_input(plan, store, rehash, section)
            inputs_by_name[name] = datasets[name].digest
    tokenizer = None
    if any("tokenizer" in s.inputs for s in plan.stages):
        tokenizer = tokenizer_input(source_dir, store, rehash)
        inputs_by_name["tokenizer"] = tokenizer.digest
    previous = read_record(store, plan.recipe.name)
    known_files, new_files = previous.get(FILES, {}), listings([source, *datasets.values(), tokenizer])
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
        reasons = () if cached else tuple(explain_change(previous.get(stage.name), key.material, known_files, new_files))
        if stage.name == "build-engine" and toolchain is None:
            cached, reasons = False, ("trtllm-build is not available here",)
        statuses.append(StageStatus(stage, key, cached, reasons))
    return ResolvedPlan(plan, source_dir, sources, tuple(statuses), toolchain, datasets.get("calibration-data"),
                        tokenizer, datasets.get("verify-data"))


def listings(inputs: Iterable[InputFiles | None]) -> dict[str, dict]:
    """{input digest: {relpath: {size, sha256}}} of the inputs made of files."""
    return {f.digest: {n: d.to_dict() for n, d in f.files.items()} for f in inputs if f is not None and f.files}


# The last build of each recipe (by name), to explain later key changes: every stage's key material,
# and under FILES the file listing of each input digest those materials name (so that a changed input
# can be told file by file).
FILES = "_input_files"  # no stage has this name


def _record_path(store: CacheStore, recipe_name: str) -> Path:
    return store.root / "records" / f"{recipe_name}.json"


def read_record(store: CacheStore, recipe_name: str) -> dict[str, Any]:
    try:
        record = json.loads(_record_path(store, recipe_name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(store: CacheStore, resolved: ResolvedPlan) -> None:
    path = _record_path(store, resolved.plan.recipe.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = read_record(store, resolved.plan.recipe.name)
    record = {**previous, **{s.stage.name: s.key.material for s in resolved.statuses}}
    known = {**previous.get(FILES, {}), **listings(resolved.input_files().values())}
    named = {digest for name, material in record.items() if name != FILES and isinstance(material, dict)
             for digest in material.get("inputs", {}).values()}
    record[FILES] = {digest: files for digest, files in known.items() if digest in named}  # no stale listings
    atomic_write_text(path, json.dumps(record, sort_keys=True, indent=1) + "\n")
