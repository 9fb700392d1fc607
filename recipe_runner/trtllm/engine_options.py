"""trtllm-build's options per TensorRT-LLM release, and the argv a recipe's `engine:` section becomes.

The option lists are data: each recorded release's trtllm-build argparse options, read from its
tensorrt_llm/commands/build.py and plugin.py at the release tag (trtllm/releases.py).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from recipe_runner.trtllm.releases import having, release_named

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


# argparse types that are enums: trtllm-build parses --kv_cache_type with KVCacheType.from_string
# (tensorrt_llm/bindings, case-insensitive member names), which the recorded option has no choices for.
ENUM_TYPES = {"KVCacheType": ("continuous", "paged", "disabled")}


def _kind(raw: Mapping[str, Any]) -> str:
    if raw.get("action") == "store_true":
        return "switch"
    if raw.get("nargs") == "+":
        return "list"
    if raw.get("type") == "int":
        return "int"
    if raw.get("type") in ENUM_TYPES:
        return "enum"
    return "str"


@lru_cache(maxsize=None)
def build_options(release: str | None = None) -> dict[str, BuildOption]:
    """Every trtllm-build option of `release` (newest recorded when None) by name, aliases included."""
    options: dict[str, BuildOption] = {}
    for raw in release_named(release).build_options:
        choices = raw.get("choices") or ENUM_TYPES.get(raw.get("type"))
        option = BuildOption(raw["flag"].lstrip("-"), _kind(raw), tuple(choices) if choices else None,
                             raw.get("help", ""))
        for flag in [raw["flag"], *raw.get("aliases", [])]:
            options[flag.lstrip("-")] = option
    return options


def option_releases(name: str) -> list[str]:
    """The recorded releases whose trtllm-build has option --name."""
    return having(lambda r: name in build_options(r.name))


def check_extra_arg(name: str, value: Any, release: str | None = None) -> str | None:
    """Why `engine.extra_args.<name>: value` cannot be passed to `release`'s trtllm-build, or None."""
    options = build_options(release)
    bare = name.lstrip("-")
    if bare in MANAGED_OPTIONS:
        return f"--{bare} is set by recipe-runner ({MANAGED_OPTIONS[bare]}); remove it"
    owner = next((f for f, opt in ENGINE_FIELD_OPTIONS.items() if opt == bare), None)
    if owner is not None:
        return f"--{bare} has its own recipe field; set engine.{owner} instead"
    option = options.get(bare)
    if option is None:
        name_ = release_named(release).name
        elsewhere = option_releases(bare)
        if elsewhere:
            return (f"trtllm-build of TensorRT-LLM {name_} has no option --{bare} (releases that have it: "
                    f"{', '.join(elsewhere)}); set tensorrt_llm to one of them or remove it")
        close = difflib.get_close_matches(bare, list(options), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"trtllm-build of TensorRT-LLM {name_} has no option --{bare}{hint}; see `trtllm-build --help`"
    return check_value(option, value)


def check_value(option: BuildOption, value: Any) -> str | None:
    """Why `value` cannot be given to `option`, or None; a recipe's true/false for an enable/disable
    option is the word it becomes on the command line (_option_value)."""
    if isinstance(value, bool) and option.kind != "switch":
        value = "enable" if value else "disable"
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
                release: str | None = None) -> list[str]:
    """`release`'s trtllm-build arguments for a recipe's normalized `engine:` section (without the
    program); checks/release.py refuses at plan time what a release cannot take."""
    options = build_options(release)
    argv = ["--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir,
            # the timing cache would otherwise be written to the current directory
            "--output_timing_cache", f"{output_dir}/timing.cache"]
    for field_name, option_name in ENGINE_FIELD_OPTIONS.items():
        if field_name not in engine:
            continue
        value = engine[field_name]
        if field_name == "kv_cache_type" and option_name not in options:
            # 0.12 has no --kv_cache_type: its plugin switch --paged_kv_cache says paged or continuous
            if value == "disabled":
                raise ValueError(f"kv_cache_type disabled needs --kv_cache_type, which TensorRT-LLM "
                                 f"{release_named(release).name} lacks")
            argv += ["--paged_kv_cache", "enable" if value == "paged" else "disable"]
            continue
        argv += _option_value(options[option_name], value)
    for name in sorted(engine.get("extra_args", {})):
        argv += _option_value(options[name.lstrip("-")], engine["extra_args"][name])
    return argv
