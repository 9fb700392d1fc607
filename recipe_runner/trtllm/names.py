"""TensorRT-LLM tensor names for LLaMA-family checkpoints (spec §3, §7.1).

There is no name aliasing in trtllm-build: these are the module parameter paths, and layer
indices are local to the pipeline stage (every stage starts at `transformer.layers.0`).
"""
from __future__ import annotations

VOCAB_EMBEDDING = "transformer.vocab_embedding.weight"
LN_F = "transformer.ln_f.weight"
LM_HEAD = "lm_head.weight"

# Per-layer suffixes, below `transformer.layers.{local_index}.`
INPUT_LAYERNORM = "input_layernorm.weight"
QKV_WEIGHT = "attention.qkv.weight"
QKV_BIAS = "attention.qkv.bias"
DENSE_WEIGHT = "attention.dense.weight"
DENSE_BIAS = "attention.dense.bias"
POST_LAYERNORM = "post_layernorm.weight"
# TRT-LLM GatedMLP computes proj(act(fc(x)) * gate(x)): fc is HF gate_proj, gate is HF up_proj.
MLP_FC_WEIGHT = "mlp.fc.weight"
MLP_FC_BIAS = "mlp.fc.bias"
MLP_GATE_WEIGHT = "mlp.gate.weight"
MLP_GATE_BIAS = "mlp.gate.bias"
MLP_PROJ_WEIGHT = "mlp.proj.weight"
MLP_PROJ_BIAS = "mlp.proj.bias"


def layer_prefix(local_index: int) -> str:
    return f"transformer.layers.{local_index}."


def layer_tensor(local_index: int, suffix: str) -> str:
    """Full name of a per-layer tensor, e.g. layer_tensor(0, QKV_WEIGHT)."""
    return layer_prefix(local_index) + suffix
