"""Sharding rules on small hand-checkable tensors, and range/tensor views agreeing."""
from __future__ import annotations

import pytest
import torch

from recipe_runner.trtllm.sharding import (
    HeadRange,
    VocabRows,
    duplicate_kv_heads,
    kv_heads_for_rank,
    pad_vocab,
    padded_vocab_size,
    q_heads_for_rank,
    shard_qkv,
    split,
    split_range,
    vocab_rows_for_rank,
)


def rows(n_heads: int, d: int, offset: int = 0) -> torch.Tensor:
    """[n_heads·d, 1] tensor whose row value is offset + head index (identifies each head)."""
    return (offset + torch.arange(n_heads).repeat_interleave(d)).reshape(-1, 1).float()


def test_split_and_ranges():
    t = torch.arange(12).reshape(4, 3)
    assert torch.equal(split(t, 2, 1), t[2:])
    assert torch.equal(split(t, 3, 2, dim=1), t[:, 2:])
    assert split_range(12, 4, 3) == (9, 12)
    with pytest.raises(ValueError, match="not divisible"):
        split_range(10, 4, 0)


def test_duplicate_kv_heads_consecutive():
    k = rows(2, 3)  # heads 0,1 with head_dim 3
    dup = duplicate_kv_heads(k, num_kv_heads=2, tp_size=4, head_dim=3)
    assert dup.flatten().tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert duplicate_kv_heads(k, 2, 2, 3) is k  # nothing to duplicate
    bias = torch.tensor([5.0, 6.0])  # 1 head, head_dim 2, as a 1-D bias
    assert duplicate_kv_heads(bias, 1, 3, 2).tolist() == [5, 6, 5, 6, 5, 6]


@pytest.mark.parametrize("tp,expected", [
    (1, [HeadRange(0, 2)]),
    (2, [HeadRange(0, 1), HeadRange(1, 1)]),
    (4, [HeadRange(0, 1), HeadRange(0, 1), HeadRange(1, 1), HeadRange(1, 1)]),
    (8, [HeadRange(0, 1)] * 4 + [HeadRange(1, 1)] * 4),
])
def test_kv_heads_for_rank(tp, expected):
    assert [kv_heads_for_rank(2, tp, r) for r in range(tp)] == expected


def test_shard_qkv_layout_is_q_then_k_then_v():
    d = 2
    q, k, v = rows(8, d, 0), rows(2, d, 100), rows(2, d, 200)
    r3 = shard_qkv(q, k, v, num_heads=8, num_kv_heads=2, head_dim=d, tp_size=4, tp_rank=3)
    # q heads 6,7; kv head 3·2/4 = 1
    assert r3.flatten().tolist() == [6, 6, 7, 7, 101, 101, 201, 201]
    r0 = shard_qkv(q, k, v, num_heads=8, num_kv_heads=2, head_dim=d, tp_size=2, tp_rank=0)
    assert r0.flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 100, 100, 200, 200]


@pytest.mark.parametrize("nh,nkv,tp", [(8, 2, 1), (8, 2, 2), (8, 2, 4), (8, 2, 8), (8, 8, 4),
                                       (8, 1, 8), (12, 4, 2), (16, 4, 8)])
def test_range_view_equals_tensor_view(nh, nkv, tp):
    """The planner's row ranges pick exactly the rows shard_qkv produces."""
    d = 3
    q, k, v = rows(nh, d, 0), rows(nkv, d, 100), rows(nkv, d, 200)
    for r in range(tp):
        ref = shard_qkv(q, k, v, num_heads=nh, num_kv_heads=nkv, head_dim=d, tp_size=tp,
                        tp_rank=r)
        qh, kvh = q_heads_for_rank(nh, tp, r), kv_heads_for_rank(nkv, tp, r)
        got = torch.cat([q[slice(*qh.rows(d))], k[slice(*kvh.rows(d))],
                         v[slice(*kvh.rows(d))]])
        assert torch.equal(got, ref)


def test_pad_vocab_appends_zero_rows():
    t = torch.ones(5, 2)
    p = pad_vocab(t, 4)
    assert p.shape == (8, 2)
    assert torch.equal(p[:5], t) and torch.count_nonzero(p[5:]) == 0
    assert pad_vocab(t, 5) is t
    assert padded_vocab_size(1001, 2) == 1002 and padded_vocab_size(128256, 8) == 128256


@pytest.mark.parametrize("V,tp", [(1001, 2), (1001, 4), (1001, 8), (5, 8), (1000, 4)])
def test_vocab_rows_match_pad_then_split(V, tp):
    table = torch.arange(1, V + 1).float().reshape(-1, 1)
    padded = pad_vocab(table, tp)
    for r in range(tp):
        vr = vocab_rows_for_rank(V, tp, r)
        got = torch.cat([table[vr.start:vr.stop], torch.zeros(vr.pad_rows, 1)])
        assert torch.equal(got, split(padded, tp, r))


def test_vocab_rows_example():
    assert [vocab_rows_for_rank(1001, 2, r) for r in range(2)] == [VocabRows(0, 501, 0),
                                                                  VocabRows(501, 1001, 1)]
