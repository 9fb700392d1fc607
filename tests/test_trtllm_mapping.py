"""Rank arithmetic, pipeline layer assignment and mapping checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from recipe_runner.hf.config import ModelConfig
from recipe_runner.checks.mapping import mapping_findings
from recipe_runner.trtllm.mapping import (
    ParallelMapping,
    all_ranks,
    allowed_tp_sizes,
    pp_layers,
    rank_coords,
    rank_of,
)

TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1001, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=8)
LLAMA70B = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, head_dim=128)


@pytest.mark.parametrize("layers,pp", [(4, 1), (4, 2), (5, 2), (7, 3), (80, 3), (3, 3)])
def test_pp_layers_matches_tensor_split(layers, pp):
    expected = [t.tolist() for t in torch.tensor_split(torch.arange(layers), pp)]
    assert [pp_layers(layers, pp, p) for p in range(pp)] == expected


def test_pp_layers_first_stages_get_the_extra_layer():
    assert [pp_layers(7, 3, p) for p in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_rank_order_is_tp_fastest():
    assert [(c.pp_rank, c.tp_rank) for c in all_ranks(2, 2)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rank_of(tp_rank=1, pp_rank=2, tp_size=4) == 9
    assert rank_coords(9, 4).tp_rank == 1 and rank_coords(9, 4).pp_rank == 2


def test_valid_mappings_have_no_problems():
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 3, 4):
            assert mapping_findings(ParallelMapping(tp, pp), TINY) == []
    assert mapping_findings(ParallelMapping(8, 2, True, 1), LLAMA70B) == []


def test_allowed_tp_sizes():
    assert allowed_tp_sizes(TINY) == [1, 2, 4, 8]
    assert allowed_tp_sizes(LLAMA70B) == [1, 2, 4, 8, 16, 32, 64]
    odd = dataclasses.replace(TINY, num_attention_heads=12, num_key_value_heads=6,
                              intermediate_size=96, hidden_size=96)
    assert allowed_tp_sizes(odd) == [1, 2, 3, 6, 12]  # 4 fails the KV rule (6 vs 4)


def test_tp_not_dividing_heads():
    assert mapping_findings(ParallelMapping(3, 1), LLAMA70B) == [
        ("mapping.tp_size", "tp_size=3 does not divide num_attention_heads=64 "
                            "(allowed: 1, 2, 4, 8, 16, 32, 64)"),
        ("mapping.tp_size", "tp_size=3 does not divide intermediate_size=28672 "
                            "(allowed: 1, 2, 4, 8, 16, 32, 64)"),
    ]


def test_kv_heads_neither_split_nor_duplicated():
    cfg = dataclasses.replace(TINY, num_attention_heads=12, num_key_value_heads=6,
                              intermediate_size=96)
    assert mapping_findings(ParallelMapping(4, 1), cfg) == [
        ("mapping.tp_size", "tp_size=4 is incompatible with num_key_value_heads=6 (KV heads are "
                            "split when tp_size divides them and duplicated when they divide "
                            "tp_size) (allowed: 1, 2, 3, 6, 12)"),
    ]


def test_pp_bounds():
    assert mapping_findings(ParallelMapping(1, 5), TINY) == [
        ("mapping.pp_size", "pp_size=5 exceeds num_hidden_layers=4; every pipeline stage needs "
                            "at least one layer (allowed: 1 to 4)")]
    assert mapping_findings(ParallelMapping(1, 0), TINY) == [("mapping.pp_size", "pp_size=0 must be an integer >= 1")]
    assert mapping_findings(ParallelMapping(0, 1), TINY) == [("mapping.tp_size", "tp_size=0 must be an integer >= 1")]


def test_embedding_dim1_needs_hidden_divisible():
    cfg = dataclasses.replace(TINY, hidden_size=36, head_dim=8)  # 8 heads · 8 != hidden: fine
    assert mapping_findings(ParallelMapping(8, 1, use_parallel_embedding=True, embedding_sharding_dim=1), cfg) == [
        ("mapping.embedding_sharding_dim",
         "embedding_sharding_dim=1 splits hidden_size=36 across tp_size=8, which does not divide "
         "it; use embedding_sharding_dim: 0 (vocabulary rows, padded as needed) or a tp_size "
         "from: 1, 2, 4")]
    # without parallel embedding the hidden dim is never split
    assert mapping_findings(ParallelMapping(8, 1, use_parallel_embedding=False, embedding_sharding_dim=1), cfg) == []


def test_embedding_dim_must_be_0_or_1():
    assert mapping_findings(ParallelMapping(1, 1, True, 2), TINY) == [
        ("mapping.embedding_sharding_dim", "embedding_sharding_dim=2 is not allowed (allowed: "
                                           "0 = split the vocabulary rows, 1 = split the hidden "
                                           "dimension)")]
