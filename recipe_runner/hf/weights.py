"""Do a model directory's weights match its config.json? Torch-free, so that plan time (every
`recipe plan` / `recipe build`, warm no-op builds included) checks safetensors sources from their
headers before any stage runs; SourceCheckpoint.validate runs the same checks on any source."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.config import CONFIG_FILE, ModelConfig
from recipe_runner.hf.files import BIN_INDEX, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, _read_index, map_index
from recipe_runner.hf.safetensors_header import DTYPES, FLOAT_DTYPES, parse_safetensors_header
from recipe_runner.models import layout_for

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class WeightFacts:
    """What the checks need to know of one source tensor."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # torch's name, e.g. "torch.float16"
    is_float: bool


def check_weights(model_dir: Path, files: Sequence[Path], weights: Mapping[str, WeightFacts],
                  cfg: ModelConfig) -> None:
    """The decoder layers are exactly those config.json counts, and every tensor `cfg` implies is
    present with the right shape and a float dtype."""
    where = ", ".join(p.name for p in files)
    _check_layer_count(model_dir, where, weights, cfg.num_hidden_layers)
    for name, shape in layout_for(cfg).hf_tensors(cfg).items():
        if name not in weights:
            raise SourceModelError(
                f"{model_dir}: tensor '{name}' is missing from {where}, but config.json describes a "
                f"{cfg.architecture} that needs it; the weights do not match config.json")
        info = weights[name]
        if info.shape != shape:
            raise SourceModelError(
                f"{info.file}: tensor '{name}' has shape {list(info.shape)} but config.json implies "
                f"{list(shape)}; the weights do not match config.json")
        if not info.is_float:
            raise SourceModelError(
                f"{info.file}: tensor '{name}' has dtype {info.dtype}; only unquantized "
                "float16/bfloat16/float32 checkpoints can be converted")


def _check_layer_count(model_dir: Path, where: str, weights: Mapping[str, WeightFacts], layers: int) -> None:
    """Layer indices in the weights are exactly 0..num_hidden_layers-1: a config.json counting fewer
    layers would otherwise convert a model with its last layers silently dropped."""
    found = sorted({int(m.group(1)) for n in weights if (m := _LAYER.match(n))})
    if found == list(range(layers)):
        return
    config = model_dir / CONFIG_FILE
    if found == list(range(len(found))):
        held = f"{len(found)} decoder layers (model.layers.0 to model.layers.{len(found) - 1})" if found \
            else "no decoder layers (model.layers.N)"
    else:
        missing = sorted(set(range(max(found) + 1)) - set(found))
        held = f"decoder layers up to model.layers.{max(found)} without {', '.join(map(str, missing[:5]))}"
    raise SourceModelError(f"{config}: num_hidden_layers is {layers}, but {where} hold(s) {held}; config.json "
                           "and the weights must come from the same model — fetch the matching files")


def _header_facts(path: Path) -> dict[str, WeightFacts]:
    header = parse_safetensors_header(path)
    return {name: WeightFacts(path, e.shape, DTYPES[e.dtype][1], e.dtype in FLOAT_DTYPES)
            for name, e in header.tensors.items()}


def check_source_weights(model_dir: Path, cfg: ModelConfig) -> None:
    """Plan-time check of the source weights without torch: safetensors layouts are checked in full
    (every header, the index, the tensors against config.json); a .bin index has its entries checked
    (the .bin files themselves need torch, and are checked when the convert stage opens them)."""
    if (model_dir / SAFETENSORS_INDEX).is_file():
        weights = map_index(model_dir / SAFETENSORS_INDEX, _header_facts)
    elif (model_dir / SAFETENSORS_SINGLE).is_file():
        weights = _header_facts(model_dir / SAFETENSORS_SINGLE)
    else:
        if (model_dir / BIN_INDEX).is_file():
            _read_index(model_dir / BIN_INDEX)
        return
    check_weights(model_dir, sorted({w.file for w in weights.values()}), weights, cfg)
