"""How each TensorRT-LLM tensor is cut per tensor-parallel rank.

The rules: docs/format/trtllm-checkpoint.md §3 and docs/format/verified-layouts.md.

Two views of the same rules, kept side by side so they cannot drift apart:

* range functions (`split_range`, `q_heads_for_rank`, `kv_heads_for_rank`, `vocab_rows_for_rank`)
  say which rows/columns of a Hugging Face tensor a rank needs. `out_rows` / `in_cols` apply the one
  a model layout names for a projection (models/layout.py says which rule, this module the
  arithmetic); the shard planner and the quantize artifact's per-rank rules both go through them,
  so they read only those bytes and cannot cut a tensor two ways.
* tensor functions (`split`, `pad_vocab`, `duplicate_kv_heads`, `shard_qkv`) apply the rules to
  whole tensors, the way TensorRT-LLM's own converter does. Tests check the planner against them;
  later stages that must materialize tensors (quantization) can use them directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recipe_runner.models.layout import COLUMN, KV_HEADS, Q_HEADS, ROW, Projection

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig


def split_range(size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of piece `tp_rank` of `size` cut into `tp_size` equal contiguous pieces."""
    if size % tp_size:
        raise ValueError(f"size {size} is not divisible by tp_size {tp_size}")
    step = size // tp_size
    return tp_rank * step, (tp_rank + 1) * step


@dataclass(frozen=True)
class HeadRange:
    """Attention heads [first, first + count) of one rank."""

    first: int
    count: int

    def rows(self, head_dim: int) -> tuple[int, int]:
        """Row range of these heads in a [heads·head_dim, in] projection."""
        return self.first * head_dim, (self.first + self.count) * head_dim


def q_heads_for_rank(num_heads: int, tp_size: int, tp_rank: int) -> HeadRange:
    start, stop = split_range(num_heads, tp_size, tp_rank)
    return HeadRange(start, stop - start)


def kv_heads_for_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadRange:
    """KV heads of one rank: an equal share when tp divides them, otherwise one duplicated head.

    With num_kv_heads < tp_size each head is repeated tp/nkv times consecutively, so rank r holds
    head r·nkv/tp (tp4, kv2: ranks 0,1 -> head 0; ranks 2,3 -> head 1);
    docs/format/verified-layouts.md.
    """
    if num_kv_heads >= tp_size:
        return q_heads_for_rank(num_kv_heads, tp_size, tp_rank)
    if tp_size % num_kv_heads:
        raise ValueError(f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    return HeadRange(tp_rank * num_kv_heads // tp_size, 1)


def heads_for_rank(projection: Projection, cfg: "ModelConfig", tp_size: int, tp_rank: int) -> HeadRange:
    """The heads of a head-split projection (Q_HEADS or KV_HEADS) that rank `tp_rank` holds."""
    heads = projection.out.count(cfg)
    if projection.split == Q_HEADS:
        return q_heads_for_rank(heads, tp_size, tp_rank)
    if projection.split == KV_HEADS:
        return kv_heads_for_rank(heads, tp_size, tp_rank)
    raise ValueError(f"{projection.hf} is not split by heads")


def out_rows(projection: Projection, cfg: "ModelConfig", tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the output rows of `projection` (weight rows, bias entries) on rank `tp_rank`."""
    if projection.split == COLUMN:
        return split_range(projection.out.size(cfg), tp_size, tp_rank)
    if projection.split in (Q_HEADS, KV_HEADS):
        return heads_for_rank(projection, cfg, tp_size, tp_rank).rows(cfg.head_dim)
    raise ValueError(f"{projection.hf} is not split on its output dimension")


def in_cols(projection: Projection, cfg: "ModelConfig", tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the input columns of a row-split projection on rank `tp_rank`."""
    if projection.split == ROW:
        return split_range(projection.in_.size(cfg), tp_size, tp_rank)
    raise ValueError(f"{projection.hf} is not split on its input dimension")


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """ceil(V / tp)·tp: lm_head (and a row-split embedding) is zero-padded to this many rows."""
    return -(-vocab_size // tp_size) * tp_size


@dataclass(frozen=True)
class VocabRows:
    """Rows of a vocabulary-row-split tensor on one rank: real rows [start, stop), then zeros."""

    start: int
    stop: int
    pad_rows: int

    @property
    def total(self) -> int:
        return self.stop - self.start + self.pad_rows


def vocab_rows_for_rank(vocab_size: int, tp_size: int, tp_rank: int) -> VocabRows:
    per_rank = padded_vocab_size(vocab_size, tp_size) // tp_size
    start = min(tp_rank * per_rank, vocab_size)
    stop = min((tp_rank + 1) * per_rank, vocab_size)
    return VocabRows(start, stop, per_rank - (stop - start))


# ---- whole-tensor reference implementations ------------------------------------------------


def split(tensor: torch.Tensor, tp_size: int, tp_rank: int, dim: int = 0) -> torch.Tensor:
    """Piece `tp_rank` of `tensor` cut into `tp_size` equal pieces along `dim` (torch.chunk)."""
    start, stop = split_range(tensor.shape[dim], tp_size, tp_rank)
    return tensor.narrow(dim, start, stop - start)


def pad_vocab(tensor: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Append zero rows so dim 0 becomes padded_vocab_size(rows, tp_size)."""
    rows = tensor.shape[0]
    pad = padded_vocab_size(rows, tp_size) - rows
    if pad == 0:
        return tensor
    zeros = torch.zeros((pad, *tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, zeros], dim=0)


def duplicate_kv_heads(
    tensor: torch.Tensor, num_kv_heads: int, tp_size: int, head_dim: int
) -> torch.Tensor:
    """Repeat each KV head tp/nkv times consecutively (h0,h0,h1,h1,…) when nkv < tp.

    Works on [nkv·d, in] weights and [nkv·d] biases; returns `tensor` unchanged when nkv >= tp.
    """
    if num_kv_heads >= tp_size:
        return tensor
    if tp_size % num_kv_heads:
        raise ValueError(f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    reps = tp_size // num_kv_heads
    heads = tensor.reshape(num_kv_heads, head_dim, *tensor.shape[1:])
    return heads.repeat_interleave(reps, dim=0).reshape(tp_size * head_dim, *tensor.shape[1:])


def shard_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    tp_size: int,
    tp_rank: int,
) -> torch.Tensor:
    """Fused qkv of one rank: [q_r; k_r; v_r] (blocks, not interleaved per head),
    docs/format/trtllm-checkpoint.md §3.1."""
    del num_heads  # q is split evenly; kept in the signature so call sites name every size
    k = duplicate_kv_heads(k, num_kv_heads, tp_size, head_dim)
    v = duplicate_kv_heads(v, num_kv_heads, tp_size, head_dim)
    parts = [split(t, tp_size, tp_rank, dim=0) for t in (q, k, v)]
    return torch.cat(parts, dim=0)
