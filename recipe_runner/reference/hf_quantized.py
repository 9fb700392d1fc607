"""The quantized Hugging Face checkpoints this project writes (hf-modelopt, hf-compressed-tensors), run
on CPU in float32 one decoder layer at a time, the way their consumers compute them.

Which format a directory holds, and which projections are quantized: reference/hf_quant_format.py;
reading and dequantizing one projection (the table of formats and layouts): reference/hf_quant_linear.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from recipe_runner.errors import UserError
from recipe_runner.hf.config import ModelConfig, read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.reference.layerwise import LayerwiseLogits
from recipe_runner.reference import numerics as nx
from recipe_runner.reference.hf_quant_format import HFCheckpointError, HFQuantFormat, detect_format
from recipe_runner.reference.hf_quant_linear import Tensors, plain_linear, quantized_linear, scalar
from recipe_runner.reference.linear import RankLinear
from recipe_runner.reference.model import rms_norm
from recipe_runner.reference.rope import Rope, apply_rope


@dataclass
class HFLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    linears: dict[str, RankLinear]
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


class HFQuantizedModel(LayerwiseLogits):
    """Logits of a quantized HF LLaMA / Mistral checkpoint, computed layer by layer on CPU."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.model_config: ModelConfig = read_model_config(self.dir)
        self.format = detect_format(self.dir)
        self.reader = SourceCheckpoint(self.dir)
        c = self.model_config
        if c.hidden_act not in ("silu", "swiglu"):
            raise UserError(f"hidden_act '{c.hidden_act}' is not supported (LLaMA uses silu)")
        self.rope = Rope(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.rope.check()

    @property
    def dtype(self) -> str:
        return str(self.model_config.torch_dtype or "")

    def facts(self) -> dict[str, object]:
        f = self.format
        return {"architecture": self.model_config.architecture, "dtype": self.dtype,
                "format": f.target if f else "hf", "quant_algo": f.quant_algo if f else None,
                "kv_cache_quant_algo": f.kv_cache_quant_algo if f else None, "tp_size": 1, "pp_size": 1}

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.reader:
            raise HFCheckpointError(f"{self.dir}: tensor '{name}' is missing")
        return self.reader.read(name).to(torch.float32)

    def layer(self, index: int) -> HFLayer:
        """Decoder layer `index` as its consumer computes it (weights dequantized to float32)."""
        c, fmt = self.model_config, self.format
        pre = f"model.layers.{index}."
        d = c.head_dim
        dims = {"self_attn.q_proj": (c.num_attention_heads * d, c.hidden_size),
                "self_attn.k_proj": (c.num_key_value_heads * d, c.hidden_size),
                "self_attn.v_proj": (c.num_key_value_heads * d, c.hidden_size),
                "self_attn.o_proj": (c.hidden_size, c.num_attention_heads * d),
                "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
                "mlp.up_proj": (c.intermediate_size, c.hidden_size),
                "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
        linears = {}
        quantized = fmt.quantized_projections(index) if fmt else dict.fromkeys(dims, False)
        for proj, (o, i) in dims.items():
            t = Tensors(self.reader, f"{pre}{proj}.", fmt or HFQuantFormat("hf", None, None))
            linears[proj] = quantized_linear(fmt, t, o, i) if quantized[proj] else plain_linear(t, o, i)
        k_scale = v_scale = None
        if fmt is not None and fmt.kv_cache_quant_algo == "FP8":
            k_scale = scalar(Tensors(self.reader, f"{pre}self_attn.k_proj.", fmt), "k_scale")
            v_scale = scalar(Tensors(self.reader, f"{pre}self_attn.v_proj.", fmt), "v_scale")
        return HFLayer(self._read(pre + "input_layernorm.weight"), self._read(pre + "post_attention_layernorm.weight"),
                       linears, k_scale, v_scale)

    def _attention(self, layer: HFLayer, x: torch.Tensor) -> torch.Tensor:
        c = self.model_config
        T, d = x.shape[0], c.head_dim
        q, k, v = (layer.linears[p](x).reshape(T, -1, d).transpose(0, 1)
                   for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        cos, sin = self.rope.tables(T)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer.k_scale is not None:  # the cache holds K after rope, V as projected
            k, v = nx.fake_fp8(k, layer.k_scale), nx.fake_fp8(v, layer.v_scale)
        groups = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        return layer.linears["self_attn.o_proj"]((probs @ v).transpose(0, 1).reshape(T, -1))

    def _decoder(self, layer: HFLayer, x: torch.Tensor) -> torch.Tensor:
        eps = self.model_config.rms_norm_eps
        x = x + self._attention(layer, rms_norm(x, layer.input_norm, eps))
        h = rms_norm(x, layer.post_norm, eps)
        mlp = layer.linears
        return x + mlp["mlp.down_proj"](torch.nn.functional.silu(mlp["mlp.gate_proj"](h)) * mlp["mlp.up_proj"](h))

    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers

    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        table = self._read("model.embed_tokens.weight")
        return [table[torch.tensor(seq)] for seq in sequences]

    def load_layer(self, index: int) -> HFLayer:
        self.reader.release()  # the previous layer's mapped files
        return self.layer(index)

    def run_layer(self, layer: HFLayer, hidden: torch.Tensor) -> torch.Tensor:
        return self._decoder(layer, hidden)

    def head(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        c = self.model_config
        norm = self._read("model.norm.weight")
        head_name = "lm_head.weight"
        if head_name not in self.reader and c.tie_word_embeddings:
            head_name = "model.embed_tokens.weight"
        head = self._read(head_name)
        return [(rms_norm(h, norm, c.rms_norm_eps) @ head.T)[:, :c.vocab_size] for h in hidden]
