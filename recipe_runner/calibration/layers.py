"""One decoder layer of a Hugging Face LLaMA-family source, built and run on its own: the config set up
for an eager float32 forward, the embedding of token ids (only the rows they use read), one layer's
weights read lazily and assigned, and one batch of hidden states through it with the model's own
causal-mask and rotary helpers (what calibration/runner.py and calibration/alpha_select.py run)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, masking_utils
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral

from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.hf.remote_code import refuse_remote_code

if TYPE_CHECKING:
    from recipe_runner.calibration.stats import LayerCollector

EMBED_BLOCK_BYTES = 64 << 20


def hf_config(model_dir: Path, *, trust_remote_code: bool = False):
    """The transformers config of the source, set up for an eager float32 CPU forward; custom config
    code (auto_map) runs only with `trust_remote_code`, passed explicitly (None would ask on stdin)."""
    refuse_remote_code(model_dir, trust_remote_code)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    config._attn_implementation = "eager"
    return config


def decoder_classes(config):
    if config.model_type == "mistral":
        return modeling_mistral.MistralDecoderLayer, modeling_mistral.MistralRotaryEmbedding
    return modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding


def embed(reader: SourceCheckpoint, table: str, ids: torch.Tensor,
          max_block_bytes: int = EMBED_BLOCK_BYTES) -> torch.Tensor:
    """float32 embeddings of `ids` [B, T], reading only the row blocks of the embedding `table` that hold them."""
    vocab, hidden = reader.shape(table)
    rows_per_block = max(1, max_block_bytes // (hidden * 4))
    wanted = torch.unique(ids)
    out = torch.empty((*ids.shape, hidden), dtype=torch.float32)
    for r0 in range(0, vocab, rows_per_block):
        r1 = min(vocab, r0 + rows_per_block)
        in_block = wanted[(wanted >= r0) & (wanted < r1)]
        if not in_block.numel():
            continue
        block = reader.read(table, 0, r0, r1).float()
        hit = (ids >= r0) & (ids < r1)
        out[hit] = block[ids[hit] - r0]
    return out


def layer_tensors(config, layer_cls, reader: SourceCheckpoint, prefix: str, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer `index`'s parameters (below `prefix`) as the source stores them (its dtype, host
    memory): what the read-ahead thread loads while a device runs the previous layer (device_compute.ReadAhead)."""
    with torch.device("meta"):
        names = [name for name, _ in layer_cls(config, index).named_parameters()]
    state = {name: reader.read(prefix + name) for name in names}
    reader.release()
    return state


def assemble_layer(config, layer_cls, state: dict[str, torch.Tensor], index: int,
                   device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """Decoder layer `index` with `state`'s tensors in float32 on `device` (copied there in the source dtype,
    half the bytes of float32 for a bf16 source, then cast). `state` is consumed: each source tensor is
    dropped once cast, so host memory peaks at the float32 layer, not at it plus the source's copy; the
    module is created on the meta device and the tensors are assigned (no double allocation)."""
    with torch.device("meta"):
        layer = layer_cls(config, index)
    floats = {name: state.pop(name).to(device).float() for name in list(state)}
    layer.load_state_dict(floats, assign=True, strict=True)
    return layer.eval()


def build_layer(config, layer_cls, reader: SourceCheckpoint, prefix: str, index: int,
                device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """Decoder layer `index` read from the source, in float32 on `device`."""
    return assemble_layer(config, layer_cls, layer_tensors(config, layer_cls, reader, prefix, index), index, device)


def causal_mask(config, hidden: torch.Tensor, positions: torch.Tensor):
    make = (masking_utils.create_sliding_window_causal_mask if getattr(config, "sliding_window", None)
            else masking_utils.create_causal_mask)
    return make(config, hidden, None, None, positions)


def layer_forward(config, layer: torch.nn.Module, rotary: torch.nn.Module, h: torch.Tensor,
                  collector: LayerCollector | None = None) -> torch.Tensor:
    """Hidden states `h` [B, T, hidden] (right-padded) through one decoder layer, on their device."""
    positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    cos_sin = rotary(h, positions)
    if collector is not None:
        collector.rope = cos_sin  # K after RoPE = what the attention interface receives
    out = layer(h, attention_mask=causal_mask(config, h, positions), position_ids=positions,
                position_embeddings=cos_sin)
    return out[0] if isinstance(out, tuple) else out
