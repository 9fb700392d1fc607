"""The LLaMA layout (MistralForCausalLM has the same tensors and TensorRT-LLM converts it the same way).

Where the facts come from (copied here from the sources named; nothing outside the package is read at run time):
* HF names: transformers' LlamaForCausalLM state dict (`model.embed_tokens`, `model.layers.{i}.…`,
  `model.norm`, `lm_head`, absent when tie_word_embeddings). Biases: `attention_bias` gives q/k/v/o
  one, `mlp_bias` gate/up/down.
* TensorRT-LLM names and splits: tensorrt_llm/models/llama/convert.py and the checkpoint format
  (docs/format/trtllm-checkpoint.md §3, §7; docs/format/verified-layouts.md). Names are module parameter
  paths, no aliasing, layer indices local to the pipeline stage. q/k/v are fused into attention.qkv as
  [q_r; k_r; v_r] row blocks, split head-wise; with fewer KV heads than ranks each KV head is repeated
  tp/nkv times consecutively, so rank r holds KV head r·nkv/tp. TRT-LLM's GatedMLP computes
  proj(act(fc(x)) · gate(x)): mlp.fc is HF gate_proj (the SiLU branch), mlp.gate is HF up_proj.
  attention.dense and mlp.proj are RowLinear (input columns split, bias replicated); the rest
  ColumnLinear (output rows split, bias like the rows — TRT-LLM's own converter writes no MLP bias; this
  follows the layer classes). lm_head is zero-padded to ceil(V/tp)·tp rows and split by rows; the
  embedding only with use_parallel_embedding.
* Fused modules of the HF-format consumers (docs/format/hf-quantized-checkpoint.md §2.1, §2.2):
  TensorRT-LLM's PyTorch backend and vLLM build self_attn.qkv_proj and mlp.gate_up_proj.
"""
from __future__ import annotations

from recipe_runner.models.layout import (
    COLUMN,
    HIDDEN,
    INTERMEDIATE,
    KV_HEAD_ROWS,
    KV_HEADS,
    Q_HEAD_ROWS,
    Q_HEADS,
    REPLICATED,
    ROW,
    VOCAB,
    VOCAB_SIZE,
    InputGroup,
    ModelLayout,
    ModelTensor,
    Norm,
    Projection,
)

_ATTN, _MLP = "attention_bias", "mlp_bias"
_QKV, _GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"

LLAMA = ModelLayout(
    name="llama",
    hf_layer_prefix="model.layers.{}.",
    trtllm_layer_prefix="transformer.layers.{}.",
    embedding=ModelTensor("model.embed_tokens.weight", "transformer.vocab_embedding.weight",
                          (VOCAB_SIZE, HIDDEN), VOCAB),
    final_norm=ModelTensor("model.norm.weight", "transformer.ln_f.weight", (HIDDEN,), REPLICATED),
    lm_head=ModelTensor("lm_head.weight", "lm_head.weight", (VOCAB_SIZE, HIDDEN), VOCAB),
    projections=(
        Projection("self_attn.q_proj", "attention.qkv", Q_HEADS, Q_HEAD_ROWS, HIDDEN, _ATTN, _QKV),
        Projection("self_attn.k_proj", "attention.qkv", KV_HEADS, KV_HEAD_ROWS, HIDDEN, _ATTN, _QKV),
        Projection("self_attn.v_proj", "attention.qkv", KV_HEADS, KV_HEAD_ROWS, HIDDEN, _ATTN, _QKV),
        Projection("self_attn.o_proj", "attention.dense", ROW, HIDDEN, Q_HEAD_ROWS, _ATTN),
        Projection("mlp.gate_proj", "mlp.fc", COLUMN, INTERMEDIATE, HIDDEN, _MLP, _GATE_UP,
                   note="HF gate_proj (the SiLU branch)"),
        Projection("mlp.up_proj", "mlp.gate", COLUMN, INTERMEDIATE, HIDDEN, _MLP, _GATE_UP, note="HF up_proj"),
        Projection("mlp.down_proj", "mlp.proj", ROW, HIDDEN, INTERMEDIATE, _MLP),
    ),
    groups=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   Norm("input_layernorm", "input_layernorm")),
        InputGroup(("self_attn.o_proj",), None),  # the attention's output
        InputGroup(("mlp.gate_proj", "mlp.up_proj"), Norm("post_attention_layernorm", "post_layernorm")),
        InputGroup(("mlp.down_proj",), None),  # act(gate_proj(x)) · up_proj(x)
    ),
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
)
