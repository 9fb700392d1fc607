"""Which files of a Hugging Face model directory hold its weights (no torch import: this runs
on every warm no-op build, where importing torch would cost more than all the rest)."""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Mapping, TypeVar

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.safetensors_header import loads_strict

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
T = TypeVar("T")


def _read_index(index_path: Path) -> dict[str, Path]:
    """tensor name -> shard path from a `*.index.json`, checking every entry (see _shard_path)."""
    weight_map = _weight_map(index_path)
    model_dir = index_path.parent
    return {name: _shard_path(index_path, model_dir, name, shard) for name, shard in sorted(weight_map.items())}


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's weight_map: an object of tensor name -> shard file name (strings only)."""
    try:
        index = loads_strict(index_path.read_text(encoding="utf-8"))
    except ValueError as e:  # also a key given twice: which shard holds that tensor cannot be told
        key = getattr(e, "key", None)
        what = f"names '{key}' twice" if key else "is not valid JSON"
        raise SourceModelError(f"{index_path} {what}; fetch the index file again") from None
    except OSError as e:
        raise SourceModelError(f"{index_path} cannot be read: {e.strerror or e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise SourceModelError(f"{index_path} is not a valid index file (needs a 'weight_map' "
                               "object); fetch it again")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise SourceModelError(f"{index_path}: weight_map entry '{name}' is {shard!r}, not a shard file "
                                   "name; fetch the index file again")
    return weight_map


def _shard_path(index_path: Path, model_dir: Path, name: str, shard: str) -> Path:
    """A shard named by the index: a relative name inside the model directory (never an absolute path,
    `..`, or a symlink out of it, so an index cannot make us read, hash or publish files elsewhere)."""
    where = f"{index_path}: weight_map entry '{name}' names shard '{shard}'"
    relative = PurePosixPath(shard.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(shard).drive or ".." in relative.parts:
        raise SourceModelError(f"{where}, which is outside {model_dir}; shards must be plain file names in "
                               "the model directory — fix or fetch the index file again")
    shard_path = model_dir / shard
    if not shard_path.is_file():
        raise SourceModelError(
            f"{index_path} maps tensor '{name}' to shard '{shard}', which is missing from "
            f"{model_dir}; download all shards listed in the index"
        )
    if not _inside(shard_path.resolve(), model_dir):
        raise SourceModelError(f"{where}, a symlink to {shard_path.resolve()} outside {model_dir}; copy the "
                               "shard into the model directory")
    return shard_path


def _inside(target: Path, model_dir: Path) -> bool:
    """`target` lies in `model_dir`, or in the blob store of the Hugging Face hub cache when
    `model_dir` is one of its snapshots (whose files are symlinks to `../../blobs/<sha>`)."""
    root = model_dir.resolve()
    if target.is_relative_to(root):
        return True
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def map_index(index_path: Path, read_file: Callable[[Path], Mapping[str, T]]) -> dict[str, T]:
    """tensor name -> what `read_file(shard)` says of it, for every tensor the index lists; each shard
    is read once and must hold the tensors the index maps to it."""
    per_file: dict[Path, Mapping[str, T]] = {}
    out: dict[str, T] = {}
    for name, shard in _read_index(index_path).items():
        if shard not in per_file:
            per_file[shard] = read_file(shard)
        if name not in per_file[shard]:
            raise SourceModelError(
                f"{index_path} maps tensor '{name}' to {shard.name}, but that shard does "
                "not contain it; the shards do not match the index — fetch them again"
            )
        out[name] = per_file[shard][name]
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


def tokenizer_problem(model_dir: Path, needed_for: str = "calibration needs to tokenize its dataset") -> str | None:
    """Why `model_dir` has no usable tokenizer, or None."""
    if any((model_dir / n).is_file() for n in _VOCAB_FILES):
        return None
    return (f"the source model directory {model_dir} has no tokenizer ({', '.join(_VOCAB_FILES)}), which "
            f"{needed_for}; copy the model's tokenizer files into it")
