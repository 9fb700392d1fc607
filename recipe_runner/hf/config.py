"""Read a Hugging Face LLaMA / Mistral `config.json` into a normalized `ModelConfig`.

Handles the config dialects in use: Llama 2 / CodeLlama (rope_theta, rope_scaling linear/dynamic),
Llama 3 / 3.1 / 3.2 (rope_scaling llama3, explicit head_dim), transformers 5 (`rope_parameters`
holding rope_theta and the scaling, `dtype` instead of `torch_dtype`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.safetensors_header import loads_strict
from recipe_runner.models import LAYOUTS

SUPPORTED_ARCHITECTURES = tuple(LAYOUTS)  # the architectures with a model layout (models/)
# rope types trtllm-build understands for LLaMA (RotaryScalingType); "default" means no scaling.
SUPPORTED_ROPE_TYPES = ("linear", "dynamic", "llama3", "yarn")
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ModelConfig:
    """The facts about a source model that conversion depends on."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str | None = None
    # Mistral only; not part of the TRT-LLM checkpoint (trtllm-build ignores it), kept so the
    # planner can warn that the engine needs max_attention_window_size to honour it.
    sliding_window: int | None = None


def _error(path: Path, what: str) -> SourceModelError:
    return SourceModelError(f"{path}: {what}")


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SourceModelError(
            f"{path} not found: the source must be a Hugging Face model directory containing "
            "config.json and the weights (*.safetensors or pytorch_model*.bin)"
        )
    try:
        # strict: NaN / Infinity (which Python's json accepts) are not JSON, and a key given twice
        # leaves which value is meant unknown
        data = loads_strict(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _error(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _error(path, f"cannot be read ({e}); fetch it again") from None
    except ValueError as e:
        key = getattr(e, "key", None)
        what = f"names '{key}' twice" if key else f"holds {e}, which is not JSON (write a finite number)"
        raise _error(path, f"{what}; fix or fetch it again") from None
    if not isinstance(data, dict):
        raise _error(path, f"must hold a JSON object, but holds a JSON {_json_kind(data)}; fetch the model's "
                     "config.json again")
    return data


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _int(raw: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise _error(path, f"missing required key '{key}'")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error(path, f"'{key}' must be a positive integer, got {value!r}")
    return value


def _float(raw: dict[str, Any], key: str, path: Path, default: float) -> float:
    """A number that must be finite and > 0 (rms_norm_eps, rope_theta: 0 or NaN gives NaN logits)."""
    value = raw.get(key, default)
    if value is None:
        value = default
    return _positive_number(value, key, path)


def _positive_number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise _error(path, f"'{key}' must be a finite number greater than 0, got {value!r}")
    return float(value)


def _architecture(raw: dict[str, Any], path: Path) -> str:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise _error(path, "missing 'architectures' (e.g. [\"LlamaForCausalLM\"]); supported: "
                     + ", ".join(SUPPORTED_ARCHITECTURES))
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise _error(path, f"unsupported architecture '{archs[0]}'; supported: "
                     + ", ".join(SUPPORTED_ARCHITECTURES))
    return archs[0]


def _rope(raw: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either dialect; rope_scaling is HF's dict or None."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5: theta lives inside the scaling dict
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: Any = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    theta = _positive_number(theta, "rope_theta", path)
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise _error(path, f"'rope_scaling' must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    # TRT-LLM has no "default" rotary scaling type; an unscaled rope must be written as null.
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _error(path, f"unsupported rope scaling type '{rope_type}'; supported: "
                     + ", ".join(SUPPORTED_ROPE_TYPES))
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
            or factor <= 0:
        raise _error(path, f"rope scaling '{rope_type}' needs a finite 'factor' greater than 0, got {factor!r}")
    return float(theta), dict(scaling)


def _torch_dtype(raw: dict[str, Any]) -> str | None:
    value = raw.get("torch_dtype", raw.get("dtype"))  # transformers 5 writes "dtype"
    if not isinstance(value, str):
        return None
    return value.removeprefix("torch.")


def parse_model_config(raw: dict[str, Any], path: Path) -> ModelConfig:
    """Normalize an already-loaded HF config dict; `path` is only used in error messages."""
    architecture = _architecture(raw, path)
    hidden = _int(raw, "hidden_size", path)
    heads = _int(raw, "num_attention_heads", path)
    kv_heads = _int(raw, "num_key_value_heads", path, default=heads)
    head_dim_raw = raw.get("head_dim")
    if head_dim_raw is None:
        if hidden % heads:
            raise _error(path, f"hidden_size={hidden} is not divisible by num_attention_heads="
                         f"{heads} and no head_dim is given")
        head_dim = hidden // heads
    else:
        head_dim = _int(raw, "head_dim", path)
    if heads % kv_heads:
        raise _error(path, f"num_attention_heads={heads} is not a multiple of "
                     f"num_key_value_heads={kv_heads}")
    theta, scaling = _rope(raw, path)
    sliding = raw.get("sliding_window")
    return ModelConfig(
        architecture=architecture,
        vocab_size=_int(raw, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size", path),
        num_hidden_layers=_int(raw, "num_hidden_layers", path),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=str(raw.get("hidden_act", "silu")),
        rms_norm_eps=_float(raw, "rms_norm_eps", path, 1e-6),
        max_position_embeddings=_int(raw, "max_position_embeddings", path, default=2048),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False) or raw.get("bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        torch_dtype=_torch_dtype(raw),
        sliding_window=sliding if isinstance(sliding, int) and not isinstance(sliding, bool)
        else None,
    )


def read_model_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate `<model_dir>/config.json`; raises SourceModelError naming the file."""
    path = Path(model_dir) / CONFIG_FILE
    return parse_model_config(_load_json(path), path)
