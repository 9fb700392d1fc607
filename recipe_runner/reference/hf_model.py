"""The Hugging Face side of the comparison: the source model's own transformers modules, run one
decoder layer at a time in float32 so that memory stays at one layer for any model size.

Each layer is constructed on the meta device (no allocation, no random init) and given the
source's tensors for that layer, read lazily through SourceCheckpoint; embeddings, the final
norm and lm_head are read the same way. The result equals `AutoModelForCausalLM`'s forward
(tests check it on a tiny model), except that Mistral's sliding window is not applied: the
attention is plainly causal, as in a TensorRT-LLM engine built without max_attention_window_size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.hf.remote_code import refuse_remote_code
from recipe_runner.reference.layerwise import LayerwiseLogits
from recipe_runner.models import layout_for


def _modules(architecture: str):
    """(decoder layer, RMSNorm, rotary embedding) classes of the model's architecture."""
    if architecture == "MistralForCausalLM":
        m = modeling_mistral
        return m.MistralDecoderLayer, m.MistralRMSNorm, m.MistralRotaryEmbedding
    m = modeling_llama
    return m.LlamaDecoderLayer, m.LlamaRMSNorm, m.LlamaRotaryEmbedding


class HFLayerwiseModel(LayerwiseLogits):
    """Logits of a HF LLaMA / Mistral model directory, computed layer by layer."""

    def __init__(self, model_dir: str | Path, *, trust_remote_code: bool = False):
        self.model_dir = Path(model_dir)
        refuse_remote_code(self.model_dir, trust_remote_code)
        self.model_config = read_model_config(self.model_dir)  # validates the architecture
        self.layout = layout_for(self.model_config)
        self.source = SourceCheckpoint(self.model_dir)
        self.source.validate(self.model_config)
        try:
            # explicit: left None, transformers would ask "[y/N]" on stdin for a config with auto_map
            self.config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise SourceModelError(f"{self.model_dir}: transformers cannot read config.json ({e})") from None
        # eager attention with an explicit causal mask: the plain math, on every torch build
        self.config._attn_implementation = "eager"
        self.layer_cls, self.norm_cls, rotary_cls = _modules(self.model_config.architecture)
        self.rotary = rotary_cls(config=self.config)

    def _read(self, name: str) -> torch.Tensor:
        return self.source.read(name).to(torch.float32)

    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers

    def load_layer(self, index: int) -> torch.nn.Module:
        prefix = self.layout.hf_layer_tensor(index, "")
        state = {n[len(prefix):]: self._read(n) for n in self.source.names() if n.startswith(prefix)}
        with torch.device("meta"):
            layer = self.layer_cls(self.config, index)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        table = self._read(self.layout.embedding.hf)
        return [table[torch.tensor(seq)] for seq in sequences]  # [T, H]

    def run_layer(self, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """[T, H] through the transformers decoder layer (which takes a batch: [1, T, H])."""
        h = h.unsqueeze(0)
        T = h.shape[1]
        positions = torch.arange(T, device=h.device).unsqueeze(0)
        mask = torch.full((T, T), float("-inf"), device=h.device).triu(1)[None, None]
        position_embeddings = self.rotary.to(h.device)(h, positions)  # verify's --device: where h is
        out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
        return (out[0] if isinstance(out, tuple) else out)[0]

    def head(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.device("meta"):
            norm = self.norm_cls(self.model_config.hidden_size, eps=self.model_config.rms_norm_eps)
        norm.load_state_dict({"weight": self._read(self.layout.final_norm.hf)}, assign=True)
        head = self._read(self.layout.embedding.hf if self.model_config.tie_word_embeddings else self.layout.lm_head.hf)
        return [norm(h) @ head.T for h in hidden]
