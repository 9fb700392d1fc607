"""Cache keys: sha256 over the canonical JSON of everything a stage's output depends on.

A key is known before its stage runs: it hashes the stage name and implementation
version, exactly the recipe fields the stage reads, its inputs (the source files'
sha256, or the keys of upstream stages, which stand for their deterministic
outputs) and the versions of the tools involved.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

from recipe_runner.pipeline.progress import format_size
from recipe_runner.recipe.model import canonical_json
from recipe_runner.store.lock import differing_files
from recipe_runner.stages.registry import STAGES



@dataclass(frozen=True)
class CacheKey:
    stage: str
    digest: str  # sha256 hex of canonical_json(material)
    material: Mapping[str, Any]  # what was hashed; kept to explain why a key changed

    @property
    def short(self) -> str:
        return self.digest[:12]


def make_key(stage: str, params: Mapping[str, Any], inputs: Mapping[str, str], tools: Mapping[str, str]) -> CacheKey:
    material = {
        "stage": stage,
        "version": STAGES[stage].version,
        "params": dict(params),
        "inputs": dict(inputs),
        "tools": dict(tools),
    }
    digest = hashlib.sha256(canonical_json(material).encode("utf-8")).hexdigest()
    return CacheKey(stage, digest, material)


def digest_of_files(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 standing for a set of files ({relpath: {size, sha256}})."""
    listing = {name: {"sha256": f["sha256"], "size": f["size"]} for name, f in files.items()}
    return hashlib.sha256(canonical_json(listing).encode("utf-8")).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


Listings = Mapping[str, Mapping[str, Mapping[str, Any]]]  # {input digest: {relpath: {size, sha256}}}
LISTED_FILES = 3  # a changed input names at most this many files, then "and N more"


def explain_change(old: Mapping[str, Any] | None, new: Mapping[str, Any], old_files: Listings | None = None,
                   new_files: Listings | None = None) -> list[str]:
    """Why a stage's key differs from the one it had in `old` (material of the last build); a changed
    input whose file listings are known before (`old_files`) and now (`new_files`) names its files."""
    if old is None:
        return ["never built"]
    reasons = []
    for section, label in (("params", "recipe"), ("inputs", "input"), ("tools", "tool"), ("version", "stage version")):
        before, after = _flatten(old.get(section, {})), _flatten(new.get(section, {}))
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                if label == "input":
                    reasons.append(_describe_input(name, (old_files or {}).get(before.get(name)),
                                                   (new_files or {}).get(after.get(name))))
                else:
                    reasons.append(_describe(label, name, before.get(name, "<unset>"), after.get(name, "<unset>")))
    return reasons or ["cache entry missing (removed by gc or quarantined)"]


def _describe_input(name: str, before: Mapping[str, Mapping[str, Any]] | None,
                    after: Mapping[str, Mapping[str, Any]] | None) -> str:
    """"input source changed: model-00002-of-00004.safetensors (size 4.6 GiB → 4.6 GiB, sha256
    1a2b3c4d5e6f… → 3c4d5e6f7a8b…), tokenizer.model added, and 2 more"; without both listings (a
    record of an older recipe-runner, an input not made of files) just "input source changed"."""
    if before is None or after is None:
        return f"input {name} changed"
    changes = []
    for rel, old, new in differing_files(before, after):
        if old is None:
            changes.append(f"{rel} added")
        elif new is None:
            changes.append(f"{rel} removed")
        else:
            sizes = (format_size(old["size"]), format_size(new["size"]))
            if sizes[0] == sizes[1] and old["size"] != new["size"]:
                sizes = (f"{old['size']} B", f"{new['size']} B")
            changes.append(f"{rel} (size {sizes[0]} → {sizes[1]}, sha256 {old['sha256'][:12]}… → "
                           f"{new['sha256'][:12]}…)")
    if not changes:
        return f"input {name} changed"
    more = len(changes) - LISTED_FILES
    listed = ", ".join(changes[:LISTED_FILES]) + (f", and {more} more" if more > 0 else "")
    return f"input {name} changed: {listed}"


def _describe(label: str, name: str, before: Any, after: Any) -> str:
    short = lambda v: canonical_json(v) if not isinstance(v, str) else v  # noqa: E731
    name = f" {name}" if name else ""
    return f"{label}{name}: {short(before)} -> {short(after)}"
