"""Which files of a Hugging Face model directory hold its weights (no torch import: this runs
on every warm no-op build, where importing torch would cost more than all the rest)."""
from __future__ import annotations

import json
from pathlib import Path

from recipe_runner.errors import SourceModelError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _read_index(index_path: Path) -> dict[str, Path]:
    """tensor name -> shard path from a `*.index.json`, checking every shard exists."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise SourceModelError(f"{index_path} is not a valid index file (needs a 'weight_map' "
                               "object); fetch it again") from None
    out: dict[str, Path] = {}
    for name, shard in sorted(weight_map.items()):
        shard_path = index_path.parent / str(shard)
        if not shard_path.is_file():
            raise SourceModelError(
                f"{index_path} maps tensor '{name}' to shard '{shard}', which is missing from "
                f"{index_path.parent}; download all shards listed in the index"
            )
        out[name] = shard_path
    return out



def weight_files(model_dir: Path) -> list[Path]:
    """The weight files the model loads, in the order HF prefers them (safetensors first), plus
    the index that lists them; empty when there are none (the reader explains that case)."""
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (model_dir / index).is_file():
            return sorted({*_read_index(model_dir / index).values(), model_dir / index})
        if (model_dir / single).is_file():
            return [model_dir / single]
    return []


# Files that define a Hugging Face tokenizer; any change to them reruns calibration.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
# At least one of these must exist: the vocabulary itself.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_files(model_dir: Path) -> list[Path]:
    return [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]


def tokenizer_problem(model_dir: Path) -> str | None:
    """Why `model_dir` has no usable tokenizer, or None."""
    if any((model_dir / n).is_file() for n in _VOCAB_FILES):
        return None
    return (f"the source model directory {model_dir} has no tokenizer ({', '.join(_VOCAB_FILES)}), which "
            "calibration needs to tokenize its dataset; copy the model's tokenizer files into it")
