"""The reference forward: the TensorRT-LLM LLaMA decoder run on CPU in float32, from a checkpoint
directory alone, one layer at a time.

Each layer runs the way the engine's tensor-parallel ranks run it: every rank computes its own
heads and its slice of the MLP from its own rank file, and the partial outputs of the
row-parallel layers (attention.dense, mlp.proj) are summed, as the all-reduce does. So a tensor
on the wrong rank, a swapped block or a mis-duplicated KV head shows up in the logits exactly as
it would in the engine. Only one layer's tensors (from all its ranks) are in memory at a time.

What is simulated: weight storage (dtype, quantization), activation quantization of the quant
algo, and K/V quantization of the KV cache. What is not: fp16/bf16 rounding of activations
(everything computes in float32, so the figures measure the checkpoint, not CPU kernels), and
the FP8 requantization trtllm-build does when it fuses fc and gate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from recipe_runner.errors import UserError
from recipe_runner.reference import numerics as nx
from recipe_runner.reference.checkpoint import (
    LM_HEAD,
    LN_F,
    VOCAB_EMBEDDING,
    CheckpointConfig,
    CheckpointError,
    CheckpointReader,
)
from recipe_runner.reference.layerwise import LayerwiseLogits
from recipe_runner.reference.linear import RankLinear, check_algos, rank_linear
from recipe_runner.reference.rope import Rope, apply_rope

KV_CACHE_SCALE = "attention.kv_cache_scaling_factor"


@dataclass
class RankLayer:
    """One decoder layer as one TP rank holds it."""

    input_norm: torch.Tensor
    qkv: RankLinear
    dense: RankLinear
    post_norm: torch.Tensor
    fc: RankLinear  # HF gate_proj: the SiLU branch
    gate: RankLinear  # HF up_proj: the linear multiplier
    proj: RankLinear
    kv_scale: torch.Tensor | None  # dequant scale of the quantized KV cache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def build_rank_layer(cfg: CheckpointConfig, tensors: dict[str, torch.Tensor], *, where: str,
                     prefix: str, tp_rank: int) -> RankLayer:
    def linear(module: str, row_parallel: bool = False) -> RankLinear:
        # a row-parallel bias is added once, after the all-reduce: keep it on rank 0 only
        return rank_linear(cfg, tensors, module, where=where, prefix=prefix,
                           with_bias=not row_parallel or tp_rank == 0)

    def norm(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{where}: {prefix}{name} is missing")
        return tensors[name].to(torch.float32)

    kv_scale = None
    if cfg.kv_cache_quant_algo is not None:
        if KV_CACHE_SCALE not in tensors:
            raise CheckpointError(f"{where}: {prefix}{KV_CACHE_SCALE} is missing; "
                                  f"kv_cache_quant_algo {cfg.kv_cache_quant_algo} needs it")
        kv_scale = tensors[KV_CACHE_SCALE].to(torch.float32).reshape(())
    layer = RankLayer(norm("input_layernorm.weight"), linear("attention.qkv"), linear("attention.dense", True),
                      norm("post_layernorm.weight"), linear("mlp.fc"), linear("mlp.gate"), linear("mlp.proj", True),
                      kv_scale)
    _check_shapes(cfg, layer, where, prefix)
    return layer


def _check_shapes(cfg: CheckpointConfig, layer: RankLayer, where: str, prefix: str) -> None:
    """The shapes trtllm-build's modules declare for one rank (docs/format/trtllm-checkpoint.md §3)."""
    H, d, tp = cfg.hidden_size, cfg.head_size, cfg.tp_size
    nq, nkv = cfg.q_heads_per_rank, cfg.kv_heads_per_rank
    qkv_rows = (nq + 2 * nkv) * d
    inter = cfg.intermediate_size // tp
    expected = {
        "attention.qkv": (layer.qkv, (qkv_rows, H)),
        "attention.dense": (layer.dense, (H, nq * d)),
        "mlp.fc": (layer.fc, (inter, H)),
        "mlp.gate": (layer.gate, (inter, H)),
        "mlp.proj": (layer.proj, (H, inter)),
    }
    for module, (lin, shape) in expected.items():
        got = tuple(lin.weight.shape)
        if got == shape:
            continue
        why = f"is {list(got)} (as a float [out, in] weight), trtllm-build expects {list(shape)}"
        if module == "attention.qkv":
            why += (f" = ({nq} q heads + 2 x {nkv} kv heads) x head_size {d} per rank")
            if cfg.num_kv_heads < tp:
                why += (f"; with num_key_value_heads={cfg.num_kv_heads} < tp_size={tp} every rank must hold "
                        "one whole, duplicated KV head")
        raise CheckpointError(f"{where}: {prefix}{module}.weight {why}")
    for name, norm in (("input_layernorm.weight", layer.input_norm), ("post_layernorm.weight", layer.post_norm)):
        if tuple(norm.shape) != (H,):
            raise CheckpointError(f"{where}: {prefix}{name} is {list(norm.shape)}, expected [{H}]")


def _quantize_kv(x: torch.Tensor, algo: str | None, scale: torch.Tensor | None) -> torch.Tensor:
    """K/V as the generation phase reads them back from a quantized cache (written after rope)."""
    if algo is None:
        return x
    return nx.fake_int8(x, scale) if algo == "INT8" else nx.fake_fp8(x, scale)


def rank_attention(cfg: CheckpointConfig, layer: RankLayer, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
    """This rank's partial attention output [T, H] (before the all-reduce)."""
    T, d = x.shape[0], cfg.head_size
    nq, nkv = cfg.q_heads_per_rank, cfg.kv_heads_per_rank
    q, k, v = layer.qkv(x).split([nq * d, nkv * d, nkv * d], dim=-1)
    q, k, v = (t.reshape(T, -1, d).transpose(0, 1) for t in (q, k, v))  # [heads, T, d]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = _quantize_kv(k, cfg.kv_cache_quant_algo, layer.kv_scale)
    v = _quantize_kv(v, cfg.kv_cache_quant_algo, layer.kv_scale)
    # local q head j uses local kv head j // (nq / nkv): within a rank the GQA groups are contiguous
    k, v = k.repeat_interleave(nq // nkv, dim=0), v.repeat_interleave(nq // nkv, dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    context = (probs @ v).transpose(0, 1).reshape(T, nq * d)
    return layer.dense(context)


def rank_mlp(layer: RankLayer, x: torch.Tensor) -> torch.Tensor:
    """proj(silu(fc(x)) * gate(x)) on this rank's slice of the intermediate dimension."""
    return layer.proj(torch.nn.functional.silu(layer.fc(x)) * layer.gate(x))


def decoder_layer(cfg: CheckpointConfig, ranks: list[RankLayer], x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope.tables(x.shape[0])
    eps = cfg.norm_epsilon
    x = x + sum(rank_attention(cfg, r, rms_norm(x, r.input_norm, eps), cos, sin) for r in ranks)
    return x + sum(rank_mlp(r, rms_norm(x, r.post_norm, eps)) for r in ranks)


class ReferenceModel(LayerwiseLogits):
    """Logits of a TensorRT-LLM LLaMA checkpoint, computed from the checkpoint alone."""

    def __init__(self, ckpt_dir: str | Path):
        self.reader = CheckpointReader(ckpt_dir)
        cfg = self.config = self.reader.config
        check_algos(cfg)
        if cfg.hidden_act not in ("silu", "swiglu"):
            raise UserError(f"hidden_act '{cfg.hidden_act}' is not supported (LLaMA uses silu)")
        if cfg.num_heads % cfg.tp_size or cfg.intermediate_size % cfg.tp_size:
            raise UserError(f"{self.reader.dir}: tp_size={cfg.tp_size} does not divide num_attention_heads="
                            f"{cfg.num_heads} and intermediate_size={cfg.intermediate_size}")
        self.rope = Rope(cfg.head_size, cfg.rotary_base, cfg.rotary_scaling, cfg.max_position_embeddings)
        self.rope.check()

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def run_layer(self, ranks: list[RankLayer], hidden: torch.Tensor) -> torch.Tensor:
        return decoder_layer(self.config, ranks, hidden, self.rope)

    def load_layer(self, layer: int) -> list[RankLayer]:
        cfg = self.config
        pp_rank, local = cfg.locate_layer(layer)
        out = []
        for tp_rank, tensors in enumerate(self.reader.layer(layer)):
            rank = cfg.rank(tp_rank, pp_rank)
            out.append(build_rank_layer(cfg, tensors, where=self.reader.files[rank].name,
                                        prefix=f"transformer.layers.{local}.", tp_rank=tp_rank))
        return out

    def _replicated(self, name: str, pp_rank: int) -> torch.Tensor:
        """A tensor every TP rank of a stage holds in full; they must agree."""
        copies = self.reader.stage_tensors(name, pp_rank)
        for tp_rank, other in enumerate(copies[1:], 1):
            if not torch.equal(copies[0], other):
                raise CheckpointError(f"{name} differs between rank {self.config.rank(0, pp_rank)} and rank "
                                      f"{self.config.rank(tp_rank, pp_rank)}; it must be replicated")
        return copies[0]

    def _embedding_table(self) -> torch.Tensor:
        cfg = self.config
        if not cfg.use_parallel_embedding:
            table = self._replicated(VOCAB_EMBEDDING, 0)
        else:  # row (vocab) or column (hidden) shards, gathered as the lookup's all-reduce does
            table = torch.cat(self.reader.stage_tensors(VOCAB_EMBEDDING, 0), dim=cfg.embedding_sharding_dim)
        if table.shape[0] < cfg.vocab_size or table.shape[1] != cfg.hidden_size:
            raise CheckpointError(f"{VOCAB_EMBEDDING} gathers to {list(table.shape)}, expected at least "
                                  f"[{cfg.vocab_size}, {cfg.hidden_size}]")
        return table

    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        table = self._embedding_table()
        return [table[torch.tensor(seq)].to(torch.float32) for seq in sequences]

    def head(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        cfg = self.config
        last = cfg.pp_size - 1
        norm = self._replicated(LN_F, last).to(torch.float32)
        shards = []
        for tp_rank in range(cfg.tp_size):
            rank = cfg.rank(tp_rank, last)
            if not self.reader.has(rank, LM_HEAD) and cfg.share_embedding_table:
                shards.append(self.reader.tensor(rank, VOCAB_EMBEDDING))  # lm_head shares the table
            else:
                shards.append(self.reader.tensor(rank, LM_HEAD))
        head = torch.cat(shards, dim=0).to(torch.float32)  # column-parallel, gathered; padded rows at the end
        if head.shape[0] < cfg.vocab_size or head.shape[1] != cfg.hidden_size:
            raise CheckpointError(f"{LM_HEAD} gathers to {list(head.shape)}, expected at least "
                                  f"[{cfg.vocab_size}, {cfg.hidden_size}]")
        return [(rms_norm(h, norm, cfg.norm_epsilon) @ head.T)[:, :cfg.vocab_size] for h in hidden]
