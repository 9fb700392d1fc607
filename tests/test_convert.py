"""End to end: tiny HF models -> TRT-LLM checkpoints, reassembled and compared bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from recipe_runner.api import convert
from recipe_runner.trtllm.mapping import ParallelMapping

GRID = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2)]


def expected_rank_names(config: dict, rank: int) -> set[str]:
    """The tensor list for one rank (docs/format/trtllm-checkpoint.md §3, §3.4), written out independently."""
    tp, pp, L = (config["mapping"]["tp_size"], config["mapping"]["pp_size"],
                 config["num_hidden_layers"])
    pp_rank = rank // tp
    n_local = len(torch.tensor_split(torch.arange(L), pp)[pp_rank])
    names = set()
    for i in range(n_local):
        for s in ("input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight",
                  "post_layernorm.weight", "mlp.fc.weight", "mlp.gate.weight",
                  "mlp.proj.weight"):
            names.add(f"transformer.layers.{i}.{s}")
        if config["attn_bias"]:
            names |= {f"transformer.layers.{i}.attention.qkv.bias",
                      f"transformer.layers.{i}.attention.dense.bias"}
    if pp_rank == 0:
        names.add("transformer.vocab_embedding.weight")
    if pp_rank == pp - 1:
        names |= {"transformer.ln_f.weight", "lm_head.weight"}
    return names


def assert_round_trip(model_dir, ckpt, hf_tensors, reassemble_checkpoint, checkpoint_ranks,
                      dtype=None):
    src = hf_tensors(model_dir)
    if "lm_head.weight" not in src:  # tied: lm_head is the embedding
        src["lm_head.weight"] = src["model.embed_tokens.weight"]
    got = reassemble_checkpoint(ckpt)
    assert set(got) == set(src)
    for name, ref in src.items():
        want = ref if dtype is None else ref.to(dtype)
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name], want), name
    config, ranks = checkpoint_ranks(ckpt)
    for r, tensors in enumerate(ranks):
        assert set(tensors) == expected_rank_names(config, r), f"rank {r}"


@pytest.mark.parametrize("tp,pp", GRID)
def test_gqa_round_trip_every_mapping(tp, pp, tiny_model, tmp_path, hf_tensors,
                                      reassemble_checkpoint, checkpoint_ranks):
    model = tiny_model("gqa")
    ckpt = convert(model, tmp_path / "ckpt", tp_size=tp, pp_size=pp)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["config.json"] + [f"rank{r}.safetensors" for r in range(tp * pp)])
    assert_round_trip(model, ckpt, hf_tensors, reassemble_checkpoint, checkpoint_ranks)


@pytest.mark.parametrize("variant,tp,pp", [
    ("mha", 1, 1), ("mha", 4, 2), ("mha", 8, 1),
    ("tied", 1, 1), ("tied", 2, 2), ("tied", 8, 1),
    ("bf16", 2, 1), ("bf16", 4, 2),
    ("sharded", 2, 2), ("sharded", 8, 1),
    ("bin", 1, 2), ("bin", 4, 1),
    ("mistral", 2, 2), ("mistral", 8, 1),
    ("bias", 2, 1), ("bias", 8, 2),
    ("mqa_headdim", 4, 2), ("mqa_headdim", 1, 1),
])
def test_variant_round_trip(variant, tp, pp, tiny_model, tmp_path, hf_tensors,
                            reassemble_checkpoint, checkpoint_ranks):
    model = tiny_model(variant)
    ckpt = convert(model, tmp_path / "ckpt", tp_size=tp, pp_size=pp)
    assert_round_trip(model, ckpt, hf_tensors, reassemble_checkpoint, checkpoint_ranks)


@pytest.mark.parametrize("tp", [4, 8])
def test_kv_duplication_rank_holds_head_r_nkv_over_tp(tp, tiny_model, tmp_path, hf_tensors,
                                                      checkpoint_ranks):
    model = tiny_model("gqa")  # 8 heads, 2 KV heads, head_dim 8
    src = hf_tensors(model)
    _, ranks = checkpoint_ranks(convert(model, tmp_path / "c", tp_size=tp))
    d, q_rows = 8, 8 // tp * 8
    for r, tensors in enumerate(ranks):
        head = r * 2 // tp
        qkv = tensors["transformer.layers.1.attention.qkv.weight"]
        assert qkv.shape == (q_rows + 2 * d, 64)
        k_ref = src["model.layers.1.self_attn.k_proj.weight"][head * d:(head + 1) * d]
        v_ref = src["model.layers.1.self_attn.v_proj.weight"][head * d:(head + 1) * d]
        assert torch.equal(qkv[q_rows:q_rows + d], k_ref)
        assert torch.equal(qkv[q_rows + d:], v_ref)
        q_ref = src["model.layers.1.self_attn.q_proj.weight"][r * q_rows:(r + 1) * q_rows]
        assert torch.equal(qkv[:q_rows], q_ref)


def test_lm_head_padding_rows_are_zero(tiny_model, tmp_path, hf_tensors, checkpoint_ranks):
    model = tiny_model("gqa")  # vocab 1001 -> padded to 1004 at tp 4: 251 rows per rank
    src = hf_tensors(model)["lm_head.weight"]
    _, ranks = checkpoint_ranks(convert(model, tmp_path / "c", tp_size=4))
    heads = [r["lm_head.weight"] for r in ranks]
    assert [h.shape for h in heads] == [(251, 64)] * 4
    assert torch.equal(heads[0], src[:251])
    assert torch.equal(heads[3][:248], src[753:])
    assert torch.count_nonzero(heads[3][248:]) == 0
    for r in ranks:  # embedding replicated and unpadded without parallel embedding
        assert torch.equal(r["transformer.vocab_embedding.weight"],
                           hf_tensors(model)["model.embed_tokens.weight"])


def test_parallel_embedding_dim0_pads_like_lm_head(tiny_model, tmp_path, hf_tensors,
                                                   checkpoint_ranks, reassemble_checkpoint):
    model = tiny_model("gqa")
    emb = hf_tensors(model)["model.embed_tokens.weight"]
    ckpt = convert(model, tmp_path / "c", tp_size=2, use_parallel_embedding=True)
    config, ranks = checkpoint_ranks(ckpt)
    assert config["use_parallel_embedding"] is True and config["embedding_sharding_dim"] == 0
    assert config["vocab_size"] == 1001
    e0, e1 = (r["transformer.vocab_embedding.weight"] for r in ranks)
    assert e0.shape == e1.shape == (501, 64)  # docs/format/verified-layouts.md: 1001, tp 2 -> 501 rows
    assert torch.equal(e0, emb[:501])
    assert torch.equal(e1[:500], emb[501:])
    assert torch.count_nonzero(e1[500]) == 0
    assert torch.equal(reassemble_checkpoint(ckpt)["model.embed_tokens.weight"], emb)


def test_parallel_embedding_dim1_splits_hidden(tiny_model, tmp_path, hf_tensors,
                                               checkpoint_ranks):
    model = tiny_model("gqa")
    emb = hf_tensors(model)["model.embed_tokens.weight"]
    ckpt = convert(model, tmp_path / "c", tp_size=4, pp_size=2, use_parallel_embedding=True,
                   embedding_sharding_dim=1)
    config, ranks = checkpoint_ranks(ckpt)
    assert config["embedding_sharding_dim"] == 1
    for t in range(4):
        assert torch.equal(ranks[t]["transformer.vocab_embedding.weight"],
                           emb[:, t * 16:(t + 1) * 16])
    for r in ranks[4:]:
        assert "transformer.vocab_embedding.weight" not in r


def test_bf16_to_fp16_values(tiny_model, tmp_path, hf_tensors, reassemble_checkpoint,
                             checkpoint_ranks):
    model = tiny_model("bf16")
    src = hf_tensors(model)
    assert src["model.norm.weight"].dtype == torch.bfloat16
    ckpt = convert(model, tmp_path / "c", tp_size=2, dtype="float16")
    config, ranks = checkpoint_ranks(ckpt)
    assert config["dtype"] == "float16"
    assert all(t.dtype == torch.float16 for r in ranks for t in r.values())
    got = reassemble_checkpoint(ckpt)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(got[name], src[name].to(torch.float16))
        # bf16 values of this size are exactly representable in fp16
        assert torch.equal(got[name].to(torch.bfloat16), src[name])
    assert_round_trip(model, ckpt, hf_tensors, reassemble_checkpoint, checkpoint_ranks,
                      dtype=torch.float16)


def test_fp16_to_fp32_is_exact(tiny_model, tmp_path, hf_tensors, reassemble_checkpoint,
                               checkpoint_ranks):
    model = tiny_model("gqa")
    ckpt = convert(model, tmp_path / "c", tp_size=2, pp_size=2, dtype="float32")
    assert_round_trip(model, ckpt, hf_tensors, reassemble_checkpoint, checkpoint_ranks,
                      dtype=torch.float32)


def test_auto_dtype_keeps_source_dtype(tiny_model, tmp_path, checkpoint_ranks):
    config, ranks = checkpoint_ranks(convert(tiny_model("bf16"), tmp_path / "c"))
    assert config["dtype"] == "bfloat16"
    assert {t.dtype for t in ranks[0].values()} == {torch.bfloat16}


def test_config_json_fields(tiny_model, tmp_path):
    ckpt = convert(tiny_model("gqa"), tmp_path / "c", tp_size=4, pp_size=2)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["mapping"] == {"world_size": 8, "tp_size": 4, "pp_size": 2}
    assert config["quantization"] == {
        "quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128,
        "smoothquant_val": 0.5, "clamp_val": None, "use_meta_recipe": False,
        "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None}
    expected = {
        "dtype": "float16", "logits_dtype": "float32", "vocab_size": 1001,
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_size": 8, "hidden_act": "silu",
        "intermediate_size": 128, "norm_epsilon": 1e-6,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
        "rotary_scaling": None, "max_position_embeddings": 2048,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "share_embedding_table": False, "qk_layernorm": False, "mlp_bias": False,
        "attn_bias": False, "tie_word_embeddings": False,
    }
    assert {k: config[k] for k in expected} == expected
    assert "moe" not in config


def test_mistral_config_and_llama3_rope(tiny_model, tmp_path):
    ckpt = convert(tiny_model("mistral"), tmp_path / "m")
    assert json.loads((ckpt / "config.json").read_text())["architecture"] == "MistralForCausalLM"
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = tiny_model(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    config = json.loads((convert(model, tmp_path / "l") / "config.json").read_text())
    assert config["rotary_base"] == 500000.0
    assert config["rotary_scaling"] == scaling
    assert config["max_position_embeddings"] == 131072


def test_workers_do_not_change_bytes(tiny_model, tmp_path):
    model = tiny_model("gqa")
    one = convert(model, tmp_path / "w1", tp_size=2, pp_size=2, workers=1)
    two = convert(model, tmp_path / "w2", tp_size=2, pp_size=2, workers=2)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


def _same_rank_files(outs, world_size: int) -> None:
    """Every output holds the bytes of the first, and each rank file's recorded sha256 (the one the
    writer computed while writing, io/written.py) is that of its bytes."""
    import hashlib

    from recipe_runner.io.written import written_sha256

    for r in range(world_size):
        f = outs[0] / f"rank{r}.safetensors"
        data = f.read_bytes()
        assert written_sha256(f, f.stat()) == hashlib.sha256(data).hexdigest()
        for other in outs[1:]:
            assert (other / f.name).read_bytes() == data, (other.name, f.name)


@pytest.mark.parametrize("parallel_embedding,workers", [(True, (2, 4)), (False, (2,))])
def test_cast_path_bytes_do_not_depend_on_workers_or_blocks(parallel_embedding, workers, tiny_model, tmp_path,
                                                            hf_tensors, reassemble_checkpoint, checkpoint_ranks):
    """bf16 -> float16, every tensor cast into reused buffers, written and hashed on their own threads:
    1 to 4 rank processes, whole tensors or 100-byte row blocks, one result, equal to the source cast
    tensor by tensor."""
    from recipe_runner.stages.shard import write_checkpoint
    from recipe_runner.stages.shard_plan import plan_convert

    model = tiny_model("bf16")
    manifest = plan_convert(model, mapping=ParallelMapping(4, 1, parallel_embedding), dtype="float16")
    runs = [(1, 64 << 20), (1, 100), *((w, 100 if w == 2 else 64 << 20) for w in workers)]
    outs = [write_checkpoint(manifest, model, tmp_path / f"w{w}-{b}", workers=w, max_block_bytes=b) for w, b in runs]
    _same_rank_files(outs, 4)
    assert_round_trip(model, outs[0], hf_tensors, reassemble_checkpoint, checkpoint_ranks, dtype=torch.float16)


def test_replicated_cast_tensors_are_computed_once(tiny_model, tmp_path, monkeypatch):
    """With ranks written one after another, a tensor several ranks hold cast the same way (the replicated
    embedding, the norms) is computed for the first and copied from its bytes for the others: same files."""
    from recipe_runner.stages import shard
    from recipe_runner.stages.shard_plan import plan_convert

    model = tiny_model("bf16")
    manifest = plan_convert(model, mapping=ParallelMapping(4), dtype="float16")
    computed: list[str] = []
    real = shard.iter_output_blocks

    def counting(plan, *args, **kwargs):
        computed.append(plan.name)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(shard, "iter_output_blocks", counting)
    monkeypatch.setattr(shard, "REPLICA_MIN_BYTES", 0)
    reused = shard.write_checkpoint(manifest, model, tmp_path / "reused")
    assert computed.count("transformer.vocab_embedding.weight") == 1
    assert computed.count("transformer.ln_f.weight") == 1
    monkeypatch.setattr(shard, "REPLICA_MIN_BYTES", 1 << 62)
    computed.clear()
    each = shard.write_checkpoint(manifest, model, tmp_path / "each")
    assert computed.count("transformer.vocab_embedding.weight") == 4
    _same_rank_files([reused, each], 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_other_casts_do_not_depend_on_blocks(dtype, tiny_model, tmp_path, hf_tensors, reassemble_checkpoint,
                                             checkpoint_ranks):
    from recipe_runner.stages.shard import write_checkpoint
    from recipe_runner.stages.shard_plan import plan_convert

    model = tiny_model("gqa")  # float16
    manifest = plan_convert(model, mapping=ParallelMapping(2, 2), dtype=dtype)
    outs = [write_checkpoint(manifest, model, tmp_path / f"b{b}", max_block_bytes=b) for b in (64 << 20, 100, 7)]
    _same_rank_files(outs, 4)
    assert_round_trip(model, outs[0], hf_tensors, reassemble_checkpoint, checkpoint_ranks, dtype=getattr(torch, dtype))


def test_output_is_deterministic_and_loads_with_safe_open(tiny_model, tmp_path):
    model = tiny_model("sharded")
    a = convert(model, tmp_path / "a", tp_size=4)
    b = convert(model, tmp_path / "b", tp_size=4)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    with safe_open(str(a / "rank3.safetensors"), "pt") as f:
        assert f.metadata() is None  # nothing time- or path-dependent
        assert f.get_tensor("lm_head.weight").shape == (251, 64)
    assert str(tmp_path) not in (a / "config.json").read_text()


@pytest.mark.parametrize("variant", ["gqa", "sharded"])
def test_kernel_copies_and_small_blocks_give_same_bytes(variant, tiny_model, tmp_path):
    """Kernel byte-range copies, whole-tensor writes and tiny row blocks: one result."""
    from recipe_runner.stages.shard_plan import plan_convert
    from recipe_runner.stages.shard import write_checkpoint

    model = tiny_model(variant)
    manifest = plan_convert(model, mapping=ParallelMapping(tp_size=2, pp_size=2, use_parallel_embedding=True))
    fast = write_checkpoint(manifest, model, tmp_path / "fast")
    whole = write_checkpoint(manifest, model, tmp_path / "whole", zero_copy=False)
    small = write_checkpoint(manifest, model, tmp_path / "small", max_block_bytes=100,
                             zero_copy=False)
    for r in range(4):
        f = f"rank{r}.safetensors"
        assert (fast / f).read_bytes() == (whole / f).read_bytes() == (small / f).read_bytes()


def test_replaces_existing_checkpoint(tiny_model, tmp_path):
    model = tiny_model("gqa")
    out = convert(model, tmp_path / "c", tp_size=4)
    out = convert(model, tmp_path / "c", tp_size=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or old dirs left
