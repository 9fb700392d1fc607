"""Which of a model directory's JSON files ask transformers to run the model's own Python code.

Any top-level JSON object with an `auto_map` does: config.json (AutoConfig / AutoModel*),
tokenizer_config.json (AutoTokenizer), processor / preprocessor / image-processor configs, even
generation_config.json. transformers imports the named .py file from the model directory when
trust_remote_code is true, and asks "[y/N]" on stdin when it is None; so every call here passes
it explicitly, and a model that asks is refused before anything loads unless the user allowed it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipe_runner.errors import SourceModelError

TRUST_FIELD = "source.trust_remote_code"


def auto_maps(model_dir: Path) -> list[tuple[Path, Any]]:
    """(file, its auto_map) for each top-level *.json in `model_dir` that names custom code."""
    found = []
    for path in sorted(model_dir.glob("*.json")):
        try:
            raw = path.read_bytes()
        except OSError:  # a directory named *.json, an unreadable file: nothing transformers loads
            continue
        if b'"auto_map"' not in raw:  # cheap: tokenizer.json alone can be tens of MB
            continue
        try:
            data = json.loads(raw)
        except ValueError:  # not JSON: transformers cannot read it either (config.json is checked elsewhere)
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append((path, data["auto_map"]))
    return found


def describe(found: list[tuple[Path, Any]]) -> str:
    """e.g. "/m/tokenizer_config.json asks for custom code (auto_map: ['AutoTokenizer'])"."""
    parts = [f"{path} asks for custom code (auto_map: {sorted(m) if isinstance(m, dict) else m!r})"
             for path, m in found]
    return "; ".join(parts)


def refuse_remote_code(model_dir: Path, trust_remote_code: bool,
                       remedy: str = f"review that code, then set {TRUST_FIELD}: true to allow it") -> None:
    """Raise unless `model_dir` asks for no custom code or the user allowed it; callers that load with
    transformers check here first, so a model's code never runs unasked, whichever path got there."""
    if trust_remote_code:
        return
    found = auto_maps(model_dir)
    if found:
        raise SourceModelError(f"{describe(found)}; {remedy}")
