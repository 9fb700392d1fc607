"""trtllm-build's option list, and the checks recipes' `engine:` sections get against it.

The list is data (recipe_runner/data/trtllm_build_options.json), recorded from
TensorRT-LLM's tensorrt_llm/commands/build.py and plugin.py; see its `_about`.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

# Options recipe-runner sets itself: a recipe may not override them.
MANAGED_OPTIONS = {
    "checkpoint_dir": "the runner passes the checkpoint it built",
    "output_dir": "the runner chooses the engine directory inside its cache",
    "model_config": "engines are built from the recipe's checkpoint, not from a bare config",
    "build_config": "a BuildConfig JSON would bypass the recipe's reviewed engine settings",
}

# engine.<field> in the recipe → trtllm-build option name (without --).
ENGINE_FIELD_OPTIONS = {
    "max_batch_size": "max_batch_size",
    "max_input_len": "max_input_len",
    "max_seq_len": "max_seq_len",
    "max_num_tokens": "max_num_tokens",
    "opt_num_tokens": "opt_num_tokens",
    "max_beam_width": "max_beam_width",
    "max_prompt_embedding_table_size": "max_prompt_embedding_table_size",
    "kv_cache_type": "kv_cache_type",
    "gemm_plugin": "gemm_plugin",
    "gpt_attention_plugin": "gpt_attention_plugin",
    "context_fmha": "context_fmha",
    "use_paged_context_fmha": "use_paged_context_fmha",
    "use_fp8_context_fmha": "use_fp8_context_fmha",
    "remove_input_padding": "remove_input_padding",
    "use_fused_mlp": "use_fused_mlp",
    "tokens_per_block": "tokens_per_block",
    "multiple_profiles": "multiple_profiles",
    "reduce_fusion": "reduce_fusion",
    "logits_dtype": "logits_dtype",
    "gather_context_logits": "gather_context_logits",
    "gather_generation_logits": "gather_generation_logits",
    "workers": "workers",
    "log_level": "log_level",
}


@dataclass(frozen=True)
class BuildOption:
    name: str  # without the leading --
    kind: str  # "int", "str", "switch" (store_true), "list" (nargs +), "enum"
    choices: tuple[str, ...] | None
    help: str


def _kind(raw: Mapping[str, Any]) -> str:
    if raw.get("action") == "store_true":
        return "switch"
    if raw.get("nargs") == "+":
        return "list"
    if raw.get("type") == "int":
        return "int"
    if str(raw.get("type", "")).startswith("enum"):
        return "enum"
    return "str"


@lru_cache(maxsize=1)
def build_options() -> dict[str, BuildOption]:
    """Every trtllm-build option by name (aliases included), from the recorded list."""
    text = (resources.files("recipe_runner") / "data" / "trtllm_build_options.json").read_text("utf-8")
    options: dict[str, BuildOption] = {}
    for raw in json.loads(text)["options"]:
        option = BuildOption(raw["flag"].lstrip("-"), _kind(raw),
                             tuple(raw["choices"]) if raw.get("choices") else None, raw.get("help", ""))
        for flag in [raw["flag"], *raw.get("aliases", [])]:
            options[flag.lstrip("-")] = option
    return options


def check_extra_arg(name: str, value: Any) -> str | None:
    """Why `engine.extra_args.<name>: value` cannot be passed to trtllm-build, or None if it can."""
    options = build_options()
    bare = name.lstrip("-")
    if bare in MANAGED_OPTIONS:
        return f"--{bare} is set by recipe-runner ({MANAGED_OPTIONS[bare]}); remove it"
    owner = next((f for f, opt in ENGINE_FIELD_OPTIONS.items() if opt == bare), None)
    if owner is not None:
        return f"--{bare} has its own recipe field; set engine.{owner} instead"
    option = options.get(bare)
    if option is None:
        close = difflib.get_close_matches(bare, list(options), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"trtllm-build has no option --{bare}{hint}; see `trtllm-build --help`"
    return _check_value(option, value)


def _check_value(option: BuildOption, value: Any) -> str | None:
    flag = f"--{option.name}"
    if option.kind == "switch":
        return None if isinstance(value, bool) else f"{flag} is a switch: use true or false, not {value!r}"
    if option.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{flag} takes an integer, not {value!r}"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"{flag} takes a value, not {value!r}"
    text = str(value)
    if option.choices:
        matches = text.lower() if option.kind == "enum" else text
        if matches not in option.choices:
            return f"{flag} must be one of {list(option.choices)}, not {value!r}"
    return None


# TensorRT-LLM 0.14 introduced --kv_cache_type (BuildConfig.update_kv_cache_type); older
# releases take the plugin switch --paged_kv_cache, which later ones still accept as an alias.
_KV_CACHE_TYPE_SINCE = (0, 14)


def parse_version(text: str) -> tuple[int, ...]:
    """(0, 14, 0) from "0.14.0", "0.14.0.dev2024092400" or "1.2.0rc1"; () if unreadable."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(p) for p in match.groups() if p is not None) if match else ()


def _option_value(option: BuildOption, value: Any) -> list[str]:
    """argv words for one option: switches appear only when true, enable/disable options
    take those words, everything else its value."""
    flag = f"--{option.name}"
    if option.kind == "switch":
        return [flag] if value else []
    if isinstance(value, bool):
        return [flag, "enable" if value else "disable"]
    return [flag, str(value)]


def engine_argv(engine: Mapping[str, Any], checkpoint_dir: str, output_dir: str,
                trtllm_version: str | None = None) -> list[str]:
    """trtllm-build's arguments for a recipe's normalized `engine:` section (without the program)."""
    options = build_options()
    argv = ["--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir,
            # the timing cache would otherwise be written to the current directory
            "--output_timing_cache", f"{output_dir}/timing.cache"]
    for field_name, option_name in ENGINE_FIELD_OPTIONS.items():
        if field_name not in engine:
            continue
        value = engine[field_name]
        if field_name == "kv_cache_type" and trtllm_version and parse_version(trtllm_version)[:2] < _KV_CACHE_TYPE_SINCE:
            if value == "disabled":
                raise ValueError(f"kv_cache_type disabled needs TensorRT-LLM >= 0.14 (found {trtllm_version})")
            argv += ["--paged_kv_cache", "enable" if value == "paged" else "disable"]
            continue
        argv += _option_value(options[option_name], value)
    for name in sorted(engine.get("extra_args", {})):
        argv += _option_value(options[name.lstrip("-")], engine["extra_args"][name])
    return argv
