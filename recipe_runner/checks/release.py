"""The recipe against the TensorRT-LLM release it targets (`tensorrt_llm`; trtllm/releases.py): the
QuantAlgo and KV-cache algo its checkpoint names, and the trtllm-build options its engine passes,
must exist in that release. Each finding names the recorded releases that have what is missing."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from recipe_runner.hfexport.targets import output_targets
from recipe_runner.quant.algorithms import ALGORITHMS, KV_CACHES, TRTLLM_CHECKPOINT
from recipe_runner.trtllm.engine_options import (ENGINE_FIELD_OPTIONS, build_options, check_extra_arg, check_value,
                                                 option_releases)
from recipe_runner.trtllm.releases import FIELD, Release, having, listed, release_named, releases, unrecorded

Finding = tuple[str, str]


def release_findings(recipe: Mapping[str, Any], release_name: str | None) -> list[Finding]:
    """What `release_name` (the recipe's target; None: the newest recorded) cannot take."""
    if release_name is not None and release_name not in releases():
        return [(FIELD, unrecorded(release_name))]
    release = release_named(release_name)
    return [*_checkpoint_findings(recipe, release), *_engine_findings(recipe, release)]


def _checkpoint_findings(recipe: Mapping[str, Any], release: Release) -> Iterator[Finding]:
    if TRTLLM_CHECKPOINT not in output_targets(recipe):
        return
    quant = recipe["quantization"]
    written = (("algo", "QuantAlgo", ALGORITHMS[quant["algo"]].trtllm_quant_algo, "quant_algos"),
               ("kv_cache", "kv_cache_quant_algo", KV_CACHES[quant["kv_cache"]].trtllm_kv_algo, "kv_cache_quant_algos"))
    for field, what, value, facts in written:
        if value is None or value in getattr(release, facts):
            continue
        have = having(lambda r: value in getattr(r, facts))
        yield f"quantization.{field}", (f"{field} {quant[field]} writes {what} {value}, which TensorRT-LLM "
                                        f"{release.name} does not have (releases that have it: {listed(have)}); "
                                        f"set {FIELD} to one of them or choose another {field}")


def _engine_findings(recipe: Mapping[str, Any], release: Release) -> Iterator[Finding]:
    engine = recipe.get("engine")
    if not engine:
        return
    options = build_options(release.name)
    for field, option in ENGINE_FIELD_OPTIONS.items():
        if field in engine and option in options:
            problem = check_value(options[option], engine[field])
            if problem:  # e.g. a choice this release's trtllm-build does not list
                yield f"engine.{field}", f"TensorRT-LLM {release.name}: {problem}"
        if field not in engine or option in options:
            continue
        if field == "kv_cache_type":  # argv falls back to --paged_kv_cache, which has no "disabled"
            if engine[field] == "disabled":
                yield f"engine.{field}", (f"kv_cache_type disabled needs trtllm-build's --kv_cache_type, which "
                                          f"TensorRT-LLM {release.name} lacks (releases that have it: "
                                          f"{listed(option_releases(option))})")
            continue
        yield f"engine.{field}", (f"trtllm-build of TensorRT-LLM {release.name} has no --{option} (releases that "
                                  f"have it: {listed(option_releases(option))}); remove engine.{field}")
    for name, value in engine.get("extra_args", {}).items():
        problem = check_extra_arg(name, value, release.name)
        if problem:
            yield f"engine.extra_args.{name}", problem
