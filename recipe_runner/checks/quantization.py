"""Plan-time checks of a recipe's quantization against the source model, as (field, message).

They run with the other model checks (checks.model_findings, at plan time), so a build fails before any
stage starts. The tokenizer check reads the source's tokenizer files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from recipe_runner.checks.recipe import needs_calibration
from recipe_runner.checks.targets import model_findings
from recipe_runner.hf.config import ModelConfig
from recipe_runner.hf.files import tokenizer_problem
from recipe_runner.hfexport.targets import TRTLLM_CHECKPOINT, output_targets
from recipe_runner.quant.algorithms import ALGORITHMS, SMOOTHQUANT
from recipe_runner.models import layout_for
from recipe_runner.trtllm import quant as tq
from recipe_runner.trtllm.mapping import ParallelMapping, pp_layers

Finding = tuple[str, str]


def combination_findings(quant: Mapping[str, Any]) -> Iterator[Finding]:
    """The KV caches an algo pairs with (quant/algorithms.py says why the others are refused)."""
    algorithm = ALGORITHMS[quant["algo"]]
    if quant["kv_cache"] not in algorithm.kv_caches:
        yield "quantization.kv_cache", (f"algo {quant['algo']} with kv_cache {quant['kv_cache']} is not supported: "
                                        f"{algorithm.kv_cache_refusal}")


def exclude_findings(model: ModelConfig, quant: Mapping[str, Any], pp_size: int,
                     writes_trtllm_checkpoint: bool = True) -> Iterator[Finding]:
    """Patterns must match something, the plugin SmoothQuant form cannot exclude layers, and a
    layer-indexed pattern must mean the same with pipeline-local indices (what trtllm-build sees)."""
    field = "quantization.exclude_modules"
    patterns = list(quant["exclude_modules"])
    modules = layout_for(model).trtllm_modules(model.num_hidden_layers)
    layer_modules = [m for m in modules if m.startswith("transformer.layers.")]
    for p in patterns:
        if not any(tq.is_excluded(m, [p]) for m in modules):
            yield field, (f"pattern {p!r} matches no module of this model; patterns are fnmatch patterns over "
                          "TensorRT-LLM module names: lm_head, transformer.layers.<i>.attention.qkv, "
                          "….attention.dense, ….mlp.fc (HF gate_proj), ….mlp.gate (up_proj), ….mlp.proj")
    if ALGORITHMS[quant["algo"]].sq_plugin and writes_trtllm_checkpoint:
        hit = [m for m in layer_modules if tq.is_excluded(m, patterns)]
        if hit:
            yield field, (f"the SmoothQuant plugin form ({quant['algo']}) quantizes every decoder layer, so "
                          f"{hit[0]} cannot be excluded; use algo w8a8_sq_per_channel to keep layers unquantized")
    if pp_size > 1 and ALGORITHMS[quant["algo"]].quantizes_weights and writes_trtllm_checkpoint:
        yield from _pipeline_findings(model, patterns, pp_size)


def _pipeline_findings(model: ModelConfig, patterns: list[str], pp_size: int) -> Iterator[Finding]:
    layout = layout_for(model)
    for stage in range(pp_size):
        for local, layer in enumerate(pp_layers(model.num_hidden_layers, pp_size, stage)):
            for lin in layout.linears:
                wanted = tq.is_excluded(layout.trtllm_layer_tensor(layer, lin.name), patterns)
                seen = tq.is_excluded(layout.trtllm_layer_tensor(local, lin.name), patterns)
                if wanted != seen:
                    yield "quantization.exclude_modules", (
                        f"with pp_size={pp_size}, trtllm-build matches exclude patterns against pipeline-local "
                        f"layer indices: layer {layer} is transformer.layers.{local} on stage {stage}, so the "
                        f"patterns would {'not ' if wanted else ''}exclude its {lin.name}; use patterns without "
                        "layer indices, or pp_size 1")
                    return


def sharded_quantization_findings(model: ModelConfig, quant: Mapping[str, Any], tp_size: int) -> Iterator[Finding]:
    """Quantized tensors the trtllm-checkpoint target splits across tp_size ranks: AWQ groups must
    not straddle ranks in any input width, and SmoothQuant cannot duplicate KV heads."""
    algorithm = ALGORITHMS[quant["algo"]]
    if algorithm.grouped:
        widths = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size}
        attn = model.num_attention_heads * model.head_dim
        if attn != model.hidden_size:
            widths["attention width num_attention_heads x head_dim"] = attn
        for name, width in widths.items():
            if width % (quant["group_size"] * tp_size):
                yield "quantization.group_size", (f"group_size={quant['group_size']} x tp_size={tp_size} does not "
                                                  f"divide the model's {name}={width}; use a group size that does")
    if algorithm.family == SMOOTHQUANT and model.num_key_value_heads < tp_size:
        yield "mapping.tp_size", (f"SmoothQuant checkpoints cannot duplicate KV heads: tp_size={tp_size} exceeds "
                                  f"num_key_value_heads={model.num_key_value_heads}; use tp_size <= "
                                  f"{model.num_key_value_heads} or another algo")


def tokenizer_findings(source_dir: Path, quant: Mapping[str, Any]) -> Iterator[Finding]:
    if needs_calibration(quant):
        problem = tokenizer_problem(source_dir)
        if problem:
            yield "quantization.calibration", problem


def quantization_findings(model: ModelConfig, recipe: Mapping[str, Any], mapping: ParallelMapping,
                          source_dir: Path) -> list[Finding]:
    """`mapping` is the recipe's, built once by the caller (plan.check_against_model)."""
    quant = recipe["quantization"]
    legacy = TRTLLM_CHECKPOINT in output_targets(recipe)
    return [*combination_findings(quant), *exclude_findings(model, quant, mapping.pp_size, legacy),
            *(sharded_quantization_findings(model, quant, mapping.tp_size) if legacy else ()),
            *model_findings(model, recipe),
            *tokenizer_findings(source_dir, quant)]
