"""Read a TensorRT-LLM LLaMA checkpoint directory the way trtllm-build does: config.json, then the
tensors of one layer from every tensor-parallel rank of the pipeline stage that holds it.

This is a second, independent reading of the format (facts from docs/format/trtllm-checkpoint.md
§1–3 and docs/format/verified-layouts.md, copied here): it deliberately shares no code with
`recipe_runner.trtllm`, so a layout mistake in the converter cannot be repeated here and pass
unnoticed.

Format facts used:
  * rank = pp_rank·tp_size + tp_rank; one `rank{N}.safetensors` per rank, N < world_size.
  * pipeline stage p holds a contiguous block of layers (torch.tensor_split: the first L % pp
    stages get one extra) named with local indices `transformer.layers.{0..}`.
  * `transformer.vocab_embedding.weight` is on stage 0, `transformer.ln_f.weight` and
    `lm_head.weight` on the last stage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from recipe_runner.errors import StageFailed, UserError

VOCAB_EMBEDDING = "transformer.vocab_embedding.weight"
LN_F = "transformer.ln_f.weight"
LM_HEAD = "lm_head.weight"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class CheckpointError(StageFailed):
    """The checkpoint's tensors do not have the layout trtllm-build expects (a failed check,
    exit 1), as opposed to a directory that is not a checkpoint at all (UserError, exit 2)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """The config.json facts the reference forward depends on."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_act: str
    norm_epsilon: float
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tp_size: int
    pp_size: int
    use_parallel_embedding: bool
    embedding_sharding_dim: int
    share_embedding_table: bool
    attn_bias: bool
    mlp_bias: bool
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int
    exclude_modules: tuple[str, ...]

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def q_heads_per_rank(self) -> int:
        return self.num_heads // self.tp_size

    @property
    def kv_heads_per_rank(self) -> int:
        # KV heads are split when tp divides them and duplicated (one per rank) when tp exceeds them.
        return max(self.num_kv_heads // self.tp_size, 1)

    def stage_layers(self, pp_rank: int) -> range:
        """Global indices of the layers on pipeline stage `pp_rank` (torch.tensor_split rule)."""
        base, extra = divmod(self.num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (1 if pp_rank < extra else 0))

    def locate_layer(self, layer: int) -> tuple[int, int]:
        """(pp_rank, local index) of global layer `layer`."""
        for pp_rank in range(self.pp_size):
            layers = self.stage_layers(pp_rank)
            if layer in layers:
                return pp_rank, layer - layers.start
        raise IndexError(f"layer {layer} out of range (num_hidden_layers={self.num_layers})")

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank


def _require(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise UserError(f"{path}: missing '{key}'; not a TensorRT-LLM checkpoint config")
    return raw[key]


def parse_config(raw: dict[str, Any], path: Path) -> CheckpointConfig:
    """config.json → CheckpointConfig; UserError for what the reference cannot run."""
    arch = _require(raw, "architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: architecture '{arch}' is not supported by the reference forward "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if raw.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise UserError(f"{path}: position_embedding_type '{raw['position_embedding_type']}' is not "
                        "supported (LLaMA uses rope_gpt_neox)")
    for key in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "output_multiplier_scale"):
        if raw.get(key, 1.0) != 1.0:
            raise UserError(f"{path}: {key}={raw[key]} (Granite-style scaling) is not supported")
    if raw.get("residual_mlp") or raw.get("qk_layernorm") or raw.get("remove_duplicated_kv_heads"):
        raise UserError(f"{path}: residual_mlp / qk_layernorm / remove_duplicated_kv_heads are not supported")
    mapping = raw.get("mapping") or {}
    quant = raw.get("quantization") or {}
    heads = _require(raw, "num_attention_heads", path)
    hidden = _require(raw, "hidden_size", path)
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    world = int(mapping.get("world_size", tp * pp))
    if world != tp * pp:
        raise UserError(f"{path}: mapping.world_size={world} is not tp_size×pp_size={tp * pp}")
    return CheckpointConfig(
        architecture=arch,
        dtype=_require(raw, "dtype", path),
        vocab_size=_require(raw, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=raw.get("intermediate_size", 4 * hidden),
        num_layers=_require(raw, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_size=raw.get("head_size") or hidden // heads,
        hidden_act=raw.get("hidden_act", "silu"),
        norm_epsilon=float(raw.get("norm_epsilon", 1e-5)),
        rotary_base=float(raw.get("rotary_base", 10000.0)),
        rotary_scaling=raw.get("rotary_scaling"),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 2048),
        tp_size=tp,
        pp_size=pp,
        use_parallel_embedding=bool(raw.get("use_parallel_embedding", False)),
        embedding_sharding_dim=int(raw.get("embedding_sharding_dim", 0)),
        share_embedding_table=bool(raw.get("share_embedding_table", False)),
        attn_bias=bool(raw.get("attn_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        group_size=int(quant.get("group_size") or 128),
        exclude_modules=tuple(quant.get("exclude_modules") or ()),
    )


def read_config(ckpt_dir: Path) -> CheckpointConfig:
    path = ckpt_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{ckpt_dir}: no config.json; point at a TensorRT-LLM checkpoint directory "
                        "(config.json + rank{N}.safetensors)")
    return parse_config(read_json_object(path), path)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object, or a UserError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return data


class CheckpointReader:
    """Lazy access to a checkpoint's tensors; nothing is loaded until asked for."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.config = read_config(self.dir)
        self.files = [self.dir / f"rank{r}.safetensors" for r in range(self.config.world_size)]
        missing = [p.name for p in self.files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{self.dir}: {', '.join(missing)} missing; mapping "
                                  f"tp_size={self.config.tp_size} x pp_size={self.config.pp_size} "
                                  f"needs rank0..rank{self.config.world_size - 1}")
        self._names: list[set[str]] = []
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    self._names.append(set(f.keys()))
            except Exception as e:  # safetensors raises several types for damaged files
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def has(self, rank: int, name: str) -> bool:
        return name in self._names[rank]

    def tensor(self, rank: int, name: str) -> torch.Tensor:
        if name not in self._names[rank]:
            raise CheckpointError(f"{self.files[rank].name}: tensor '{name}' is missing "
                                  "(trtllm-build would fail: 'Required but not provided tensors')")
        with safe_open(str(self.files[rank]), framework="pt") as f:
            return f.get_tensor(name).clone()  # a copy: the file's memory map is dropped on return

    def layer(self, layer: int) -> list[dict[str, torch.Tensor]]:
        """Layer `layer`'s tensors on each TP rank of its stage: [{suffix: tensor}, ...]."""
        pp_rank, local = self.config.locate_layer(layer)
        prefix = f"transformer.layers.{local}."
        out = []
        for tp_rank in range(self.config.tp_size):
            rank = self.config.rank(tp_rank, pp_rank)
            names = sorted(n for n in self._names[rank] if n.startswith(prefix))
            if not names:
                raise CheckpointError(f"{self.files[rank].name}: no tensors named {prefix}* — pipeline stage "
                                      f"{pp_rank} must hold global layer {layer} as local layer {local}")
            out.append({n[len(prefix):]: self.tensor(rank, n) for n in names})
        return out

    def stage_tensors(self, name: str, pp_rank: int) -> list[torch.Tensor]:
        """`name` from every TP rank of pipeline stage `pp_rank`."""
        return [self.tensor(self.config.rank(t, pp_rank), name) for t in range(self.config.tp_size)]
