"""The checkpoint's config.json: fields, dtype resolution, quantization section (the format:
docs/format/trtllm-checkpoint.md §2).

trtllm-build loads it with `LLaMAConfig.from_dict(config)`: unknown top-level keys are kept (set as
attributes), but `mapping` and `quantization` are strict (`Mapping(**d)`, `QuantConfig(**d)`: unknown
keys raise TypeError) in every recorded release (trtllm/releases.py), so `quantization` carries
exactly the target release's QuantConfig fields and `mapping` only keys every release accepts.
"""
from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from recipe_runner.errors import UserError
from recipe_runner.trtllm.releases import newest, releases

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig
    from recipe_runner.trtllm.mapping import ParallelMapping
    from recipe_runner.trtllm.releases import Release

CHECKPOINT_DTYPES = ("float16", "bfloat16", "float32")


def resolve_dtype(dtype: str, hf_torch_dtype: str | None) -> str:
    """The checkpoint dtype: an explicit one, or "auto" as TensorRT-LLM's infer_dtype resolves it
    (tensorrt_llm/models/convert_utils.py, 0.12 through 1.x): the HF torch_dtype, except that float32
    and a missing torch_dtype become float16. A float32 checkpoint needs `dtype: float32`."""
    if dtype != "auto":
        if dtype not in CHECKPOINT_DTYPES:
            raise UserError(f"dtype '{dtype}' is not supported (allowed: auto, "
                            + ", ".join(CHECKPOINT_DTYPES) + ")")
        return dtype
    if hf_torch_dtype is None or hf_torch_dtype == "float32":
        return "float16"
    if hf_torch_dtype not in CHECKPOINT_DTYPES:
        raise UserError(f"dtype 'auto' cannot use the model's torch_dtype '{hf_torch_dtype}'; "
                        "set dtype to one of " + ", ".join(CHECKPOINT_DTYPES))
    return hf_torch_dtype


def quant_config(release: "Release | None" = None, **overrides: Any) -> dict[str, Any]:
    """The `quantization` dict for `release` (the newest recorded when None): its QuantConfig fields in
    declaration order with their defaults, then `overrides`. QuantConfig(**d) raises TypeError on a key
    it lacks (every recorded release), so a field this release does not have is left out when it holds
    the newest release's default (`use_meta_recipe: false` for 0.12-0.14) and refused otherwise."""
    release = release or newest()
    anywhere = set().union(*(r.quant_config for r in releases().values()))
    unknown = sorted(set(overrides) - anywhere)
    if unknown:
        raise ValueError(f"not QuantConfig fields (trtllm-build would reject them): {unknown}")
    out = dict(release.quant_config)
    for name, value in overrides.items():
        if name in out:
            out[name] = value
        elif value != newest().quant_config.get(name):
            raise ValueError(f"TensorRT-LLM {release.name}'s QuantConfig has no field {name} (needed for {value!r})")
    return out


def mapping_config(mapping: "ParallelMapping", release: "Release | None" = None) -> dict[str, int]:
    """Only the keys every recorded Mapping(**d) accepts; the rest keep their defaults at build time."""
    config = {"world_size": mapping.world_size, "tp_size": mapping.tp_size, "pp_size": mapping.pp_size}
    missing = set(config) - (release or newest()).mapping_parameters
    if missing:
        raise ValueError(f"TensorRT-LLM {(release or newest()).name}'s Mapping lacks {sorted(missing)}")
    return config


def build_checkpoint_config(
    model_config: "ModelConfig",
    *,
    dtype: str,
    mapping: "ParallelMapping",
    quantization: dict[str, Any] | None = None,
    release: "Release | None" = None,
) -> dict[str, Any]:
    """config.json for a LLaMA-family checkpoint for `release` (newest recorded when None);
    `dtype` must already be resolved."""
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype must be resolved to one of {CHECKPOINT_DTYPES}, got {dtype!r}")
    m = model_config
    return {
        "architecture": m.architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": m.vocab_size,  # unpadded; lm_head rows are padded per rank instead
        "max_position_embeddings": m.max_position_embeddings,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,  # original count, even when duplicated
        "head_size": m.head_dim,
        "hidden_act": m.hidden_act,
        "intermediate_size": m.intermediate_size,
        "norm_epsilon": m.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": m.rope_theta,
        "rotary_scaling": copy.deepcopy(m.rope_scaling),
        "use_parallel_embedding": mapping.use_parallel_embedding,
        "embedding_sharding_dim": mapping.embedding_sharding_dim,
        # lm_head is always written; 0.15+ drops it at load when it equals the embedding.
        "share_embedding_table": False,
        "qk_layernorm": False,
        "tie_word_embeddings": m.tie_word_embeddings,
        "mlp_bias": m.mlp_bias,
        "attn_bias": m.attention_bias,
        "residual_mlp": False,
        "disable_weight_only_quant_plugin": False,
        "remove_duplicated_kv_heads": False,
        "fc_after_embed": False,
        "use_input_layernorm_in_first_layer": True,
        "use_last_layernorm": True,
        "layer_idx_offset": 0,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "output_multiplier_scale": 1.0,
        # `moe` is omitted on purpose: LLaMAConfig builds a dense default when it is absent,
        # which is safer than guessing MoeConfig's version-dependent field list.
        "mapping": mapping_config(mapping, release),
        "quantization": quant_config(release, **(quantization or {})),
    }


def config_json_bytes(config: dict[str, Any]) -> bytes:
    """Deterministic serialization (key order as built, 2-space indent, trailing newline)."""
    return (json.dumps(config, indent=2, allow_nan=False) + "\n").encode("utf-8")
