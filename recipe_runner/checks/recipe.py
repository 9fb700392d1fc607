"""Cross-field rules of a recipe that a JSON Schema cannot say clearly, checked when it loads.

Each rule is a named function over the normalized recipe data that yields
(dotted path, message) pairs; the loader attaches file:line:col. Rules that
need the source model's config.json run at plan time (checks.model_findings).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping

from recipe_runner.calibration.dataset import looks_like_path
from recipe_runner.checks.release import release_findings
from recipe_runner.checks.targets import target_findings
from recipe_runner.quant import algorithms
from recipe_runner.quant.algorithms import ALGORITHMS, AWQ, FP8, KV_CACHES, SMOOTHQUANT
from recipe_runner.quant.sq_auto import is_auto
from recipe_runner.trtllm.mapping import ParallelMapping

Finding = tuple[str, str]
Rule = Callable[[Mapping[str, Any]], Iterator[Finding]]


def needs_calibration(quantization: Mapping[str, Any]) -> bool:
    return algorithms.needs_calibration(quantization["algo"], quantization["kv_cache"])


def source_is_local_or_pinned(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """source: exactly one of path / hub_id, and a hub id pinned to a commit."""
    source = recipe["source"]
    if "path" in source and "hub_id" in source:
        yield "source", "set either source.path or source.hub_id, not both"
    elif "path" not in source and "hub_id" not in source:
        yield "source", "missing the model: set source.path (a local HF model directory) or source.hub_id + source.revision"
    if "hub_id" in source and "revision" not in source:
        yield "source.hub_id", "a hub model needs source.revision: the 40-hex commit sha to use (branch names are not reproducible)"
    if "revision" in source:
        if "hub_id" not in source:
            yield "source.revision", "source.revision applies only with source.hub_id"
        elif not is_commit(source["revision"]):
            yield "source.revision", (f"{source['revision']!r} is not a commit sha; pin the 40-hex commit "
                                      "(see the model page's 'Files and versions' history)")


def is_commit(revision: Any) -> bool:
    return isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision) is not None


def calibration_revision_is_pinned(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """quantization.calibration.revision: a 40-hex commit of a dataset id (not of a local file)."""
    calibration = recipe["quantization"].get("calibration") or {}
    if "revision" not in calibration:
        return
    field = "quantization.calibration.revision"
    if looks_like_path(calibration["dataset"]):
        yield field, (f"applies only to a dataset id in the local Hugging Face cache, and dataset "
                      f"{calibration['dataset']!r} is a local file; remove revision")
    elif not is_commit(calibration["revision"]):
        yield field, (f"{calibration['revision']!r} is not a commit sha; pin the 40-hex commit of the dataset "
                      "(see the dataset page's 'Files and versions' history; branch names are not reproducible)")


def calibration_when_needed(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """Algorithms that need activation statistics need a calibration set."""
    quant = recipe["quantization"]
    if needs_calibration(quant) and "calibration" not in quant:
        why = quant["algo"] if ALGORITHMS[quant["algo"]].calibrated else f"kv_cache {quant['kv_cache']}"
        yield "quantization", (f"{why} needs calibration data: add quantization.calibration.dataset "
                               "(a local .txt/.jsonl file or a dataset id in the local HF cache)")


def smoothquant_auto_needs_smoothquant(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """smoothquant_alpha auto runs SmoothQuant's α search in calibration; another algo has no α to search
    (a number is merely unread by it: every recipe carries the default 0.5)."""
    quant = recipe["quantization"]
    if is_auto(quant["smoothquant_alpha"]) and ALGORITHMS[quant["algo"]].family != SMOOTHQUANT:
        sq = ", ".join(a for a, v in ALGORITHMS.items() if v.family == SMOOTHQUANT)
        yield "quantization.smoothquant_alpha", (f"auto searches SmoothQuant's alpha, but algo {quant['algo']} "
                                                 f"is not SmoothQuant; use one of {sq}, or remove smoothquant_alpha")


def awq_search_off_needs_awq(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """awq_search: false turns AWQ's scale search off; no other algo has that search to turn off."""
    quant = recipe["quantization"]
    if quant.get("awq_search") is False and ALGORITHMS[quant["algo"]].family != AWQ:
        yield "quantization.awq_search", (f"false turns off AWQ's scale search, but algo {quant['algo']} has "
                                          "none; use algo w4a16_awq, or remove awq_search")


def embedding_dim_needs_parallel_embedding(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    mapping = ParallelMapping.from_recipe(recipe["mapping"])
    if mapping.embedding_sharding_dim == 1 and not mapping.use_parallel_embedding:
        yield "mapping.embedding_sharding_dim", "applies only with mapping.use_parallel_embedding: true"


def engine_lengths_consistent(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    engine = recipe.get("engine")
    if not engine:
        return
    if engine["max_input_len"] > engine["max_seq_len"]:
        yield "engine.max_input_len", (f"max_input_len={engine['max_input_len']} exceeds "
                                       f"max_seq_len={engine['max_seq_len']}")
    if "opt_num_tokens" in engine and engine["opt_num_tokens"] > engine["max_num_tokens"]:
        yield "engine.opt_num_tokens", f"exceeds max_num_tokens={engine['max_num_tokens']}"
    if engine["kv_cache_type"] != "paged" and engine["use_paged_context_fmha"]:
        yield "engine.use_paged_context_fmha", f"needs kv_cache_type: paged (is {engine['kv_cache_type']!r})"


def engine_matches_quantization(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """Engine options that trtllm-build refuses for the recipe's quantization (builder.py checks)."""
    engine = recipe.get("engine")
    if not engine:
        return
    algo, kv = recipe["quantization"]["algo"], KV_CACHES[recipe["quantization"]["kv_cache"]]
    family = ALGORITHMS[algo].family
    if engine["use_paged_context_fmha"] and kv.paged_context_fmha and family != kv.paged_context_fmha_weights:
        yield "engine.use_paged_context_fmha", kv.paged_context_fmha
    if engine["gemm_plugin"] == "fp8" and family != FP8:
        yield "engine.gemm_plugin", f"gemm_plugin fp8 needs quantization.algo: fp8 (is {algo!r})"
    if engine["use_fp8_context_fmha"] and family != FP8:
        yield "engine.use_fp8_context_fmha", f"needs quantization.algo: fp8 (is {algo!r})"


def target_release_supports(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """The algo, KV cache and trtllm-build options exist in the targeted TensorRT-LLM release
    (checks/release.py; a build with trtllm-build installed checks its release again)."""
    yield from release_findings(recipe, recipe.get("tensorrt_llm"))


def verify_has_inputs(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    verify = recipe.get("verify")
    if verify and verify["enabled"] and not verify["prompts"] and not verify["token_ids"]:
        yield "verify", "verification needs inputs: add verify.prompts (text) or verify.token_ids"


def output_targets_load(recipe: Mapping[str, Any]) -> Iterator[Finding]:
    """Every output target must be loadable by a consumer with the recipe's quantization (checks/targets.py)."""
    yield from target_findings(recipe)


RULES: tuple[Rule, ...] = (
    source_is_local_or_pinned,
    calibration_when_needed,
    calibration_revision_is_pinned,
    smoothquant_auto_needs_smoothquant,
    awq_search_off_needs_awq,
    embedding_dim_needs_parallel_embedding,
    engine_lengths_consistent,
    engine_matches_quantization,
    target_release_supports,
    verify_has_inputs,
    output_targets_load,
)


def check_rules(recipe: Mapping[str, Any]) -> list[Finding]:
    return [finding for rule in RULES for finding in rule(recipe)]
