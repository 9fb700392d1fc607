"""`quantization.exclude_modules` for the Hugging Face targets.

A recipe names modules one way for every target: fnmatch patterns over TensorRT-LLM checkpoint
module names (`transformer.layers.3.attention.qkv`, `….mlp.fc`; the model layout, models/), so a recipe
that writes several targets keeps the same layers unquantized in all of them. The HF exports
translate each matched module to the HF projections it fuses and keep those in the model dtype.

The consumers fuse projections that share an input (docs/format/hf-quantized-checkpoint.md §2.1, §2.2):
TensorRT-LLM's PyTorch backend builds `self_attn.qkv_proj` and `mlp.gate_up_proj` and picks one
quantization method per fused module, matching `exclude_modules` against those fused names;
vLLM matches its module prefix exactly, as a substring or with fnmatch, and for a fused module
requires every shard (q/k/v, gate/up) to agree. So a written exclusion list names each excluded
HF projection and, for hf-modelopt, the fused alias of a fully excluded group; and a pattern set
that excludes only part of a fused group (gate_proj without up_proj: `mlp.fc` without `mlp.gate`)
is refused, because no consumer can load it. Torch-free: plan-time rules use it.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from recipe_runner.models.layout import ModelLayout
from recipe_runner.models.llama import LLAMA
from recipe_runner.trtllm import quant as tq

# always unquantized in the HF exports and listed first: ModelOpt's list, and llm-compressor's (its
# `ignore` names Linear modules only). The HF export code passes no layout yet; every architecture
# accepted today has LLaMA's (models/__init__.py), so these and the functions' default are LLaMA's.
MODELOPT_ALWAYS_EXCLUDED = (LLAMA.lm_head.hf_module, LLAMA.embedding.hf_module)
COMPRESSED_TENSORS_ALWAYS_IGNORED = (LLAMA.lm_head.hf_module,)


def _module(layout: ModelLayout, layer: int, projection: str) -> str:
    """The TensorRT-LLM module (what the recipe's patterns match) holding HF `projection` of `layer`."""
    return layout.trtllm_layer_tensor(layer, layout.projection(projection).module)


def projection_excluded(patterns: Sequence[str], layer: int, projection: str, layout: ModelLayout = LLAMA) -> bool:
    """Whether the recipe's patterns keep HF `projection` of decoder `layer` unquantized."""
    return tq.is_excluded(_module(layout, layer, projection), patterns)


def excluded_projections(patterns: Sequence[str], num_layers: int,
                         layout: ModelLayout = LLAMA) -> list[tuple[int, str]]:
    """(layer, HF projection) pairs left unquantized, in checkpoint order."""
    return [(layer, p) for layer in range(num_layers) for p in layout.projection_names
            if projection_excluded(patterns, layer, p, layout)]


def partial_fused_groups(patterns: Sequence[str], num_layers: int, layout: ModelLayout = LLAMA) -> Iterator[str]:
    """A message for each decoder layer whose fused groups the patterns split."""
    for layer in range(num_layers):
        for fused, members in layout.fused.items():
            hit = [p for p in members if projection_excluded(patterns, layer, p, layout)]
            if hit and len(hit) != len(members):
                kept = [p for p in members if p not in hit]
                yield (f"layer {layer}: the patterns exclude {_described(layout, layer, hit)} but not "
                       f"{_described(layout, layer, kept)}; TensorRT-LLM's PyTorch backend and vLLM fuse "
                       f"{' and '.join(m.split('.')[-1] for m in members)} into one {fused.split('.')[-1]}, "
                       "so exclude all of them or none")


def _described(layout: ModelLayout, layer: int, projections: Iterable[str]) -> str:
    return ", ".join(f"{_module(layout, layer, p)} ({p.split('.')[-1]})" for p in projections)


def written_exclude_list(patterns: Sequence[str], num_layers: int, *, always: Sequence[str],
                         fused_aliases: bool, layout: ModelLayout = LLAMA) -> list[str]:
    """The module names a written checkpoint lists as unquantized: `always`, then every excluded
    projection (HF names), each layer's fully excluded fused groups followed by their aliases."""
    excluded = set(excluded_projections(patterns, num_layers, layout))
    names = list(always)
    for layer in range(num_layers):
        names += [layout.hf_layer_tensor(layer, p) for p in layout.projection_names if (layer, p) in excluded]
        if fused_aliases:
            names += [layout.hf_layer_tensor(layer, fused) for fused, members in layout.fused.items()
                      if all((layer, m) in excluded for m in members)]
    return names
