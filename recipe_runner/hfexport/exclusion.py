"""`quantization.exclude_modules` for the Hugging Face targets.

A recipe names modules one way for every target: fnmatch patterns over TensorRT-LLM checkpoint
module names (`transformer.layers.3.attention.qkv`, `….mlp.fc`; trtllm/quant.py), so a recipe
that writes several targets keeps the same layers unquantized in all of them. The HF exports
translate each matched module to the HF projections it fuses and keep those in the model dtype.

The consumers fuse projections that share an input (hf-quantized-checkpoint spec §2.1, §2.2):
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

from recipe_runner.trtllm import quant as tq

# the HF projection groups a consumer fuses into one module, by fused name
FUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# always unquantized in the HF exports and listed first: ModelOpt's list, and llm-compressor's (its
# `ignore` names Linear modules only)
MODELOPT_ALWAYS_EXCLUDED = ("lm_head", "model.embed_tokens")
COMPRESSED_TENSORS_ALWAYS_IGNORED = ("lm_head",)


def projection_excluded(patterns: Sequence[str], layer: int, projection: str) -> bool:
    """Whether the recipe's patterns keep HF `projection` of decoder `layer` unquantized."""
    linear = tq.LINEAR_OF_PROJECTION[projection]
    return tq.is_excluded(tq.layer_module(layer, linear.name), patterns)


def excluded_projections(patterns: Sequence[str], num_layers: int) -> list[tuple[int, str]]:
    """(layer, HF projection) pairs left unquantized, in checkpoint order."""
    return [(layer, p) for layer in range(num_layers) for lin in tq.LINEARS for p in lin.projections
            if projection_excluded(patterns, layer, p)]


def partial_fused_groups(patterns: Sequence[str], num_layers: int) -> Iterator[str]:
    """A message for each decoder layer whose fused groups the patterns split."""
    for layer in range(num_layers):
        for fused, members in FUSED_GROUPS.items():
            hit = [p for p in members if projection_excluded(patterns, layer, p)]
            if hit and len(hit) != len(members):
                kept = [p for p in members if p not in hit]
                yield (f"layer {layer}: the patterns exclude {_described(layer, hit)} but not "
                       f"{_described(layer, kept)}; TensorRT-LLM's PyTorch backend and vLLM fuse "
                       f"{' and '.join(m.split('.')[-1] for m in members)} into one {fused.split('.')[-1]}, "
                       "so exclude all of them or none")


def _described(layer: int, projections: Iterable[str]) -> str:
    return ", ".join(f"{tq.layer_module(layer, tq.LINEAR_OF_PROJECTION[p].name)} ({p.split('.')[-1]})"
                     for p in projections)


def written_exclude_list(patterns: Sequence[str], num_layers: int, *, always: Sequence[str],
                         fused_aliases: bool) -> list[str]:
    """The module names a written checkpoint lists as unquantized: `always`, then every excluded
    projection (HF names), each layer's fully excluded fused groups followed by their aliases."""
    excluded = set(excluded_projections(patterns, num_layers))
    names = list(always)
    for layer in range(num_layers):
        for lin in tq.LINEARS:
            names += [f"model.layers.{layer}.{p}" for p in lin.projections if (layer, p) in excluded]
        if fused_aliases:
            names += [f"model.layers.{layer}.{fused}" for fused, members in FUSED_GROUPS.items()
                      if all((layer, m) in excluded for m in members)]
    return names
