"""The recipe's output targets against its quantization (load time) and against the source model's
shapes (plan time), from the facts of hfexport/targets.py and quant/algorithms.py."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from recipe_runner.hfexport.exclusion import partial_fused_groups
from recipe_runner.hfexport.targets import HF_TARGETS, consumers, hf_targets, output_targets
from recipe_runner.quant.algorithms import (ALGORITHMS, HF_COMPRESSED_TENSORS, KV_CACHES, TRTLLM_CHECKPOINT,
                                           quantizes)

Finding = tuple[str, str]


def target_findings(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """(field, message) for every target the recipe's quantization cannot be written for."""
    targets = output_targets(recipe)
    quant = recipe["quantization"]
    algo, kv = quant["algo"], quant["kv_cache"]
    hf = [t for t in targets if t in HF_TARGETS]
    algorithm = ALGORITHMS[algo]
    if not algorithm.trtllm_checkpoint and TRTLLM_CHECKPOINT in targets:
        yield "output.targets", (f"algo {algo} is written only as a Hugging Face checkpoint (trtllm-build's checkpoint "
                                 "path is not implemented for it); use output.targets: [hf-modelopt] (TensorRT-LLM "
                                 "PyTorch backend, vLLM) and/or hf-compressed-tensors (vLLM)")
    for target in hf:
        if consumers(target, algo, kv):
            continue
        reason = algorithm.hf_refusals.get(target, "no consumer loads this combination")
        if not quantizes(algo, kv):
            reason = ("there is nothing to quantize (the source loads as it is); choose a quantization.algo, or "
                      "kv_cache: fp8 for a KV-only hf-modelopt checkpoint")
        yield "quantization.algo", f"output target {target} with algo {algo}: {reason}"
    if hf and KV_CACHES[kv].quantized and KV_CACHES[kv].hf_kv_algo is None:
        yield "quantization.kv_cache", (f"output targets {', '.join(hf)}: an {kv.upper()} KV cache has no scales in "
                                        "these formats (vLLM and TensorRT-LLM's PyTorch backend read FP8 KV scales); "
                                        "use kv_cache: fp8 or none")
    if TRTLLM_CHECKPOINT not in targets:
        # verify checks every target it finds (trtllm-checkpoint and the HF exports alike)
        if recipe.get("engine"):
            yield "engine", ("an engine is built from the trtllm-checkpoint target, which output.targets does not "
                             "list; add trtllm-checkpoint to output.targets or remove engine")


def _width_rules(target: str, algo: str, group_size: int, legacy: bool) -> list[tuple[int, str, str]]:
    """(multiple, why, recipe field): what the input width of every quantized projection must divide into."""
    algorithm, rules = ALGORITHMS[algo], []
    if algorithm.block_size:
        block = algorithm.block_size
        rules.append((block, f"{algo.upper()} scales blocks of {block} inputs", "quantization.algo"))
    if algorithm.grouped and not legacy:  # the trtllm-checkpoint rule (group_size x tp_size) is stricter
        rules.append((group_size, f"group_size={group_size} groups the inputs", "quantization.group_size"))
    ct = algorithm.compressed_tensors
    if target == HF_COMPRESSED_TENSORS and ct is not None and ct.format == "pack-quantized":
        per = 32 // algorithm.weight_bits
        rules.append((per, f"pack-quantized packs {per} codes along the inputs into each int32", "quantization.algo"))
    return rules


def model_findings(model, recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """Plan-time checks of the HF targets against the source model's shapes (`model` is a
    hf.config.ModelConfig): widths the formats pack or scale in blocks, and fused groups the
    exclude patterns would split."""
    quant = recipe["quantization"]
    targets = hf_targets(recipe)
    if not targets or not quantizes(quant["algo"], quant["kv_cache"]):
        return
    widths = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
              "num_attention_heads x head_dim": model.num_attention_heads * model.head_dim}
    legacy = TRTLLM_CHECKPOINT in output_targets(recipe)
    for target in targets:
        for multiple, why, field in _width_rules(target, quant["algo"], quant["group_size"], legacy):
            for name, width in widths.items():
                if width % multiple:
                    yield field, (f"output target {target} with algo {quant['algo']}: the model's {name}={width} "
                                  f"(an input width of its linears) is not a multiple of {multiple} ({why}); "
                                  "use another algo or group size")
                    break
    for problem in partial_fused_groups(list(quant["exclude_modules"]), model.num_hidden_layers):
        yield "quantization.exclude_modules", f"output targets {', '.join(targets)}: {problem}"
        break
