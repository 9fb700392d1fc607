"""Hugging Face LLaMA / Mistral tensor names (identical for both architectures)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig

EMBED_TOKENS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

INPUT_LAYERNORM = "input_layernorm.weight"
POST_ATTENTION_LAYERNORM = "post_attention_layernorm.weight"
Q_PROJ = "self_attn.q_proj"
K_PROJ = "self_attn.k_proj"
V_PROJ = "self_attn.v_proj"
O_PROJ = "self_attn.o_proj"
GATE_PROJ = "mlp.gate_proj"
UP_PROJ = "mlp.up_proj"
DOWN_PROJ = "mlp.down_proj"


def layer_tensor(index: int, suffix: str) -> str:
    """e.g. layer_tensor(3, Q_PROJ + ".weight") -> "model.layers.3.self_attn.q_proj.weight"."""
    return f"model.layers.{index}.{suffix}"


def expected_tensors(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """Every tensor a source checkpoint must hold for `cfg`, with its shape ([out, in])."""
    H, I, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out: dict[str, tuple[int, ...]] = {EMBED_TOKENS: (cfg.vocab_size, H)}
    for i in range(cfg.num_hidden_layers):
        shapes = {
            INPUT_LAYERNORM: (H,),
            POST_ATTENTION_LAYERNORM: (H,),
            Q_PROJ + ".weight": (q_rows, H),
            K_PROJ + ".weight": (kv_rows, H),
            V_PROJ + ".weight": (kv_rows, H),
            O_PROJ + ".weight": (H, q_rows),
            GATE_PROJ + ".weight": (I, H),
            UP_PROJ + ".weight": (I, H),
            DOWN_PROJ + ".weight": (H, I),
        }
        if cfg.attention_bias:
            shapes.update({Q_PROJ + ".bias": (q_rows,), K_PROJ + ".bias": (kv_rows,),
                           V_PROJ + ".bias": (kv_rows,), O_PROJ + ".bias": (H,)})
        if cfg.mlp_bias:
            shapes.update({GATE_PROJ + ".bias": (I,), UP_PROJ + ".bias": (I,),
                           DOWN_PROJ + ".bias": (H,)})
        out.update({layer_tensor(i, k): v for k, v in shapes.items()})
    out[FINAL_NORM] = (H,)
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = (cfg.vocab_size, H)
    return out
