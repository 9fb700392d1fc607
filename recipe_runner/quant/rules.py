"""Plan-time checks of a recipe's quantization against the source model, as (field, message).

They run where plan.py runs its other model checks, so a build fails before any stage starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from recipe_runner.hf.config import ModelConfig
from recipe_runner.models import layout_for
from recipe_runner.recipe.rules import SMOOTHQUANT_ALGOS
from recipe_runner.trtllm import quant as tq
from recipe_runner.trtllm.mapping import ParallelMapping, pp_layers

Finding = tuple[str, str]

# (algo, kv_cache) pairs refused, with the reason. FP8 weights with an INT8 KV cache: no
# TensorRT-LLM tool (ModelOpt's FP8 recipes, convert_checkpoint.py) produces it, and whether
# trtllm-build's strongly typed FP8 network accepts an INT8 KV cache is unverified; we refuse it
# rather than write a checkpoint that might not load. Remove the entry once verified on a GPU.
UNSUPPORTED_COMBINATIONS: dict[tuple[str, str], str] = {
    ("fp8", "int8"): "FP8 checkpoints pair with an FP8 KV cache (TensorRT-LLM's FP8 workflow); "
                     "use kv_cache: fp8 or none",
}


def combination_findings(quant: Mapping[str, Any]) -> Iterator[Finding]:
    reason = UNSUPPORTED_COMBINATIONS.get((quant["algo"], quant["kv_cache"]))
    if reason:
        yield "quantization.kv_cache", f"algo {quant['algo']} with kv_cache {quant['kv_cache']} is not supported: {reason}"


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
    if quant["algo"] in tq.SQ_PLUGIN_ALGOS and writes_trtllm_checkpoint:
        hit = [m for m in layer_modules if tq.is_excluded(m, patterns)]
        if hit:
            yield field, (f"the SmoothQuant plugin form ({quant['algo']}) quantizes every decoder layer, so "
                          f"{hit[0]} cannot be excluded; use algo w8a8_sq_per_channel to keep layers unquantized")
    if pp_size > 1 and quant["algo"] != "none" and writes_trtllm_checkpoint:
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
    if quant["algo"] == "w4a16_awq":
        widths = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size}
        attn = model.num_attention_heads * model.head_dim
        if attn != model.hidden_size:
            widths["attention width num_attention_heads x head_dim"] = attn
        for name, width in widths.items():
            if width % (quant["group_size"] * tp_size):
                yield "quantization.group_size", (f"group_size={quant['group_size']} x tp_size={tp_size} does not "
                                                  f"divide the model's {name}={width}; use a group size that does")
    if quant["algo"] in SMOOTHQUANT_ALGOS and model.num_key_value_heads < tp_size:
        yield "mapping.tp_size", (f"SmoothQuant checkpoints cannot duplicate KV heads: tp_size={tp_size} exceeds "
                                  f"num_key_value_heads={model.num_key_value_heads}; use tp_size <= "
                                  f"{model.num_key_value_heads} or another algo")


def tokenizer_findings(source_dir: Path, quant: Mapping[str, Any]) -> Iterator[Finding]:
    from recipe_runner.hf.files import tokenizer_problem
    from recipe_runner.recipe.rules import needs_calibration

    if needs_calibration(quant):
        problem = tokenizer_problem(source_dir)
        if problem:
            yield "quantization.calibration", problem


def quantization_findings(model: ModelConfig, recipe: Mapping[str, Any], mapping: ParallelMapping,
                          source_dir: Path) -> list[Finding]:
    """`mapping` is the recipe's, built once by the caller (plan.check_against_model)."""
    from recipe_runner.hfexport.targets import TRTLLM_CHECKPOINT, model_findings, output_targets

    quant = recipe["quantization"]
    legacy = TRTLLM_CHECKPOINT in output_targets(recipe)
    return [*combination_findings(quant), *exclude_findings(model, quant, mapping.pp_size, legacy),
            *(sharded_quantization_findings(model, quant, mapping.tp_size) if legacy else ()),
            *model_findings(model, recipe),
            *tokenizer_findings(source_dir, quant)]
