"""The shard planner's manifest: lazy, deterministic, serializable, equal to the reference math."""
from __future__ import annotations

import json

import pytest
import torch

from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.stages.shard_plan import (
    Concat,
    ConvertManifest,
    Read,
    Zeros,
    plan_convert,
)
from recipe_runner.stages.shard import iter_output_blocks
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.sharding import pad_vocab, shard_qkv, split


def materialize(plan, reader, max_block_bytes):
    """The planned tensor, whole: the shard stage's converted row blocks (no zero-copy ranges) joined."""
    blocks = list(iter_output_blocks(plan, reader, max_block_bytes, zero_copy=False))
    return torch.cat(blocks, dim=0).reshape(plan.shape)


def test_json_round_trip_and_determinism(tiny_model):
    model = tiny_model("gqa")
    mapping = ParallelMapping(tp_size=4, pp_size=2, use_parallel_embedding=True)
    m = plan_convert(model, mapping=mapping)
    text = m.to_json()
    assert ConvertManifest.from_json(text) == m
    assert plan_convert(model, mapping=mapping).to_json() == text
    assert str(model) not in text  # the plan does not depend on where the source lives
    assert m.world_size == 8 and m.config["mapping"]["world_size"] == 8


def test_manifest_describes_reads_not_data(tiny_model):
    m = plan_convert(tiny_model("gqa"), mapping=ParallelMapping(tp_size=4, pp_size=2))
    r6 = m.ranks[6]  # pp_rank 1, tp_rank 2
    assert (r6.rank, r6.tp_rank, r6.pp_rank, r6.layers) == (6, 2, 1, (2, 3))
    qkv = next(t for t in r6.tensors if t.name == "transformer.layers.0.attention.qkv.weight")
    assert qkv.shape == (32, 64)
    assert qkv.source == Concat((
        Read("model.layers.2.self_attn.q_proj.weight", 0, 32, 48),
        Read("model.layers.2.self_attn.k_proj.weight", 0, 8, 16),  # kv head 2·2/4 = 1
        Read("model.layers.2.self_attn.v_proj.weight", 0, 8, 16),
    ))
    assert "kv head 1 duplicated on 2 ranks" in qkv.note
    lm = next(t for t in r6.tensors if t.name == "lm_head.weight")
    assert lm.source == Read("lm_head.weight", 0, 502, 753)
    lm3 = next(t for t in m.ranks[7].tensors if t.name == "lm_head.weight")
    assert lm3.source == Concat((Read("lm_head.weight", 0, 753, 1001), Zeros((3, 64))))
    dense = next(t for t in r6.tensors if t.name == "transformer.layers.1.attention.dense.weight")
    assert dense.source == Read("model.layers.3.self_attn.o_proj.weight", 1, 32, 48)
    assert m.source["model.embed_tokens.weight"].shape == (1001, 64)
    assert m.source["model.embed_tokens.weight"].dtype == "float16"
    # small: a few bytes per tensor, never tensor data
    assert len(m.to_json()) < 60_000


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_executed_manifest_equals_reference_functions(tp, tiny_model, hf_tensors):
    """Planner (row ranges) vs. reference tensor functions (dup + chunk, pad + split)."""
    model = tiny_model("gqa")
    ref = hf_tensors(model)
    reader = SourceCheckpoint(model)
    m = plan_convert(model, mapping=ParallelMapping(tp_size=tp))
    for plan in m.ranks:
        got = {t.name: materialize(t, reader, max_block_bytes=256) for t in plan.tensors}
        p = "model.layers.3.self_attn."
        qkv = shard_qkv(ref[p + "q_proj.weight"], ref[p + "k_proj.weight"],
                        ref[p + "v_proj.weight"], num_heads=8, num_kv_heads=2, head_dim=8,
                        tp_size=tp, tp_rank=plan.tp_rank)
        assert torch.equal(got["transformer.layers.3.attention.qkv.weight"], qkv)
        assert torch.equal(got["lm_head.weight"],
                           split(pad_vocab(ref["lm_head.weight"], tp), tp, plan.tp_rank))
        assert torch.equal(got["transformer.layers.0.mlp.proj.weight"],
                           split(ref["model.layers.0.mlp.down_proj.weight"], tp, plan.tp_rank, 1))


def test_manifest_json_is_plain_data(tiny_model):
    data = json.loads(plan_convert(tiny_model("tied"), mapping=ParallelMapping(tp_size=2)).to_json())
    assert data["format"] == "recipe-runner/convert-manifest/1"
    lm = [t for t in data["ranks"][1]["tensors"] if t["name"] == "lm_head.weight"][0]
    assert lm["source"] == {"op": "concat", "parts": [
        {"op": "read", "tensor": "model.embed_tokens.weight", "dim": 0, "start": 501,
         "stop": 1001},
        {"op": "zeros", "shape": [1, 64]}]}
    assert lm["note"].startswith("tied: from embed_tokens")
