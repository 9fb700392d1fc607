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

from recipe_runner.recipe.model import canonical_json
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


def explain_change(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Why a stage's key differs from the one it had in `old` (material of the last build)."""
    if old is None:
        return ["never built"]
    reasons = []
    for section, label in (("params", "recipe"), ("inputs", "input"), ("tools", "tool"), ("version", "stage version")):
        before, after = _flatten(old.get(section, {})), _flatten(new.get(section, {}))
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                reasons.append(_describe(label, name, before.get(name, "<unset>"), after.get(name, "<unset>")))
    return reasons or ["cache entry missing (removed by gc or quarantined)"]


def _describe(label: str, name: str, before: Any, after: Any) -> str:
    if label == "input":
        return f"input {name} changed"
    short = lambda v: canonical_json(v) if not isinstance(v, str) else v  # noqa: E731
    name = f" {name}" if name else ""
    return f"{label}{name}: {short(before)} -> {short(after)}"
