"""Deliberately broken checkpoints fail verification, with the figure (or the tensor) that shows it.

Each corruption is a real converter bug: a layout that loads into trtllm-build without complaint
and produces garbage, or one it would reject.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipe_runner.api import convert
from recipe_runner.reference.checkpoint import CheckpointError
from recipe_runner.verify.run import failure_summary, verify_checkpoint
from tests.conftest import load_hf_tensors
from tests.quantized_checkpoints import quantize_checkpoint

TOKENS = [[1, 5, 9, 200, 17, 3, 999, 45, 12, 7, 8, 1000], [300, 2, 77, 15, 16], [42, 43, 44, 45, 46, 47, 48, 49]]
Edit = Callable[[int, dict[str, torch.Tensor]], None]


def corrupt(ckpt: Path, out: Path, edit: Edit) -> Path:
    """A copy of `ckpt` with `edit(rank, tensors)` applied to every rank file."""
    shutil.copytree(ckpt, out)
    for path in sorted(out.glob("rank*.safetensors")):
        tensors = load_file(path)
        edit(int(path.stem.removeprefix("rank")), tensors)
        save_file(tensors, path)
    return out


def swap_files(ckpt: Path, out: Path, a: int, b: int) -> Path:
    shutil.copytree(ckpt, out)
    pa, pb = out / f"rank{a}.safetensors", out / f"rank{b}.safetensors"
    pa.rename(out / "tmp")
    pb.rename(pa)
    (out / "tmp").rename(pb)
    return out


def layers(tensors: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return sorted(n for n in tensors if n.endswith(suffix))


def assert_fails(ckpt: Path, model_dir: Path, *figures: str) -> None:
    result = verify_checkpoint(ckpt, model_dir, token_ids=TOKENS)
    failed = {f.figure for f in result.failures}
    assert not result.passed and set(figures) <= failed, failure_summary(result)
    summary = failure_summary(result)
    for figure in figures:
        assert figure in summary


@pytest.mark.parametrize("tp", [1, 2])
def test_q_and_k_swapped_in_qkv(tiny_model, tmp_path, tp):
    model_dir = tiny_model("mha")  # q and k blocks have the same size, so the swap loads fine
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=tp)
    rows = 64 // tp

    def swap(rank, t):
        for name in layers(t, "attention.qkv.weight"):
            q, k, v = t[name].split(rows)
            t[name] = torch.cat([k, q, v])

    assert_fails(corrupt(ckpt, tmp_path / "bad", swap), model_dir, "mean_kl", "max_abs_logit_error")


def test_gate_and_up_swapped(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=2)

    def swap(rank, t):
        for fc in layers(t, "mlp.fc.weight"):
            gate = fc.replace("mlp.fc", "mlp.gate")
            t[fc], t[gate] = t[gate], t[fc]

    assert_fails(corrupt(ckpt, tmp_path / "bad", swap), model_dir, "mean_kl", "top1_agreement")


def test_tensor_parallel_ranks_in_the_wrong_order(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=2)
    # rank files swapped: every layer still sums to the same, but lm_head's vocab halves trade places
    assert_fails(swap_files(ckpt, tmp_path / "bad", 0, 1), model_dir, "top1_agreement", "mean_kl")


def test_pipeline_stages_in_the_wrong_order(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=2, pp_size=2)
    bad = swap_files(ckpt, tmp_path / "bad", 1, 3)  # tp rank 1 of stage 0 and of stage 1
    with pytest.raises(CheckpointError, match="rank1.safetensors: tensor 'transformer.vocab_embedding.weight' is missing"):
        verify_checkpoint(bad, model_dir, token_ids=TOKENS)


def _kv_rows(model_dir: Path, layer: int, head: int, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    hf = load_hf_tensors(model_dir)
    k = hf[f"model.layers.{layer}.self_attn.k_proj.weight"]
    v = hf[f"model.layers.{layer}.self_attn.v_proj.weight"]
    return k[head * d:(head + 1) * d], v[head * d:(head + 1) * d]


def test_kv_heads_duplicated_in_the_wrong_pattern(tiny_model, tmp_path):
    # tp 4, 2 KV heads: ranks must hold heads 0,0,1,1 (repeat_interleave); a tiled 0,1,0,1 loads fine
    model_dir = tiny_model("gqa")
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=4)

    def tile(rank, t):
        for layer, name in enumerate(layers(t, "attention.qkv.weight")):
            q = t[name][:16]
            t[name] = torch.cat([q, *_kv_rows(model_dir, layer, head=rank % 2)])

    assert_fails(corrupt(ckpt, tmp_path / "bad", tile), model_dir, "top1_agreement", "mean_kl")


def test_kv_heads_not_duplicated(tiny_model, tmp_path):
    # a converter that splits 2 KV heads over 4 ranks gives each rank half a head: trtllm-build rejects it
    model_dir = tiny_model("gqa")
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=4)
    hf = load_hf_tensors(model_dir)

    def split(rank, t):
        for layer, name in enumerate(layers(t, "attention.qkv.weight")):
            k, v = (hf[f"model.layers.{layer}.self_attn.{p}_proj.weight"].chunk(4)[rank] for p in "kv")
            t[name] = torch.cat([t[name][:16], k, v])

    with pytest.raises(CheckpointError, match=r"qkv.weight is \[24, 64\].*expects \[32, 64\].*"
                                              r"num_key_value_heads=2 < tp_size=4.*duplicated KV head"):
        verify_checkpoint(corrupt(ckpt, tmp_path / "bad", split), model_dir, token_ids=TOKENS)


def test_fp8_weight_scale_stored_inverted(tiny_model, tmp_path):
    # the quant scale (448/amax) written where trtllm-build expects the dequant scale (amax/448)
    model_dir = tiny_model("gqa")
    ckpt = quantize_checkpoint(convert(model_dir, tmp_path / "plain"), tmp_path / "ok", model_dir, "fp8")
    assert verify_checkpoint(ckpt, model_dir, token_ids=TOKENS).passed

    def invert(rank, t):
        name = "transformer.layers.1.attention.qkv.weights_scaling_factor"
        t[name] = 1 / t[name]

    # FP8's logit limits are set from a trained model's wider logits (tolerances.py): on this tiny one
    # it is the flipped top-1 and the corrupted layer's error that fail, and the trace names the layer
    bad = corrupt(ckpt, tmp_path / "bad", invert)
    assert_fails(bad, model_dir, "top1_agreement", "max_layer_error")
    assert "max_layer_error 1.995 (decoder layer 1)" in failure_summary(verify_checkpoint(bad, model_dir, token_ids=TOKENS))


def test_kv_cache_scale_stored_inverted(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")
    ckpt = quantize_checkpoint(convert(model_dir, tmp_path / "plain"), tmp_path / "ok", model_dir, None, kv="INT8")
    assert verify_checkpoint(ckpt, model_dir, token_ids=TOKENS).passed

    def invert(rank, t):
        for name in layers(t, "kv_cache_scaling_factor"):
            t[name] = 1 / t[name]

    assert_fails(corrupt(ckpt, tmp_path / "bad", invert), model_dir, "mean_kl")


def test_missing_smoothquant_scale_names_the_tensor(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")
    ckpt = quantize_checkpoint(convert(model_dir, tmp_path / "plain"), tmp_path / "ok", model_dir, "sq_per_tensor")

    def drop(rank, t):
        del t["transformer.layers.2.mlp.quantization_scaling_factor"]

    with pytest.raises(CheckpointError, match="rank0.safetensors: transformer.layers.2.mlp.quantization_scaling_factor "
                                              "is missing; quant_algo W8A8_SQ_PER_TENSOR_PLUGIN needs it"):
        verify_checkpoint(corrupt(ckpt, tmp_path / "bad", drop), model_dir, token_ids=TOKENS)


# ---- one layer's layout bug: the logit figures can stay inside their limits; the layer trace does not ----

LAYER = 2  # of the tiny models' 4


def _swap_one_qk_head_pair(tp: int) -> Edit:
    def edit(rank: int, t: dict[str, torch.Tensor]) -> None:
        if rank == 0:  # rank 0's first query head and first key head trade rows
            w = t[f"transformer.layers.{LAYER}.attention.qkv.weight"]
            q_rows = 64 // tp
            q, k = w[0:8].clone(), w[q_rows:q_rows + 8].clone()
            w[0:8], w[q_rows:q_rows + 8] = k, q
    return edit


def _swap_gate_up(tp: int) -> Edit:
    def edit(rank: int, t: dict[str, torch.Tensor]) -> None:
        fc, gate = f"transformer.layers.{LAYER}.mlp.fc.weight", f"transformer.layers.{LAYER}.mlp.gate.weight"
        t[fc], t[gate] = t[gate].clone(), t[fc].clone()
    return edit


def _swap_rank_slices(ckpt: Path) -> Edit:
    name = f"transformer.layers.{LAYER}.attention.dense.weight"
    slices = {r: load_file(ckpt / f"rank{r}.safetensors")[name] for r in (0, 1)}

    def edit(rank: int, t: dict[str, torch.Tensor]) -> None:
        t[name] = slices[1 - rank].clone()
    return edit


@pytest.mark.parametrize("variant", ["mha", "gqa"])
@pytest.mark.parametrize("bug", ["qk_head", "gate_up", "rank_slices"])
def test_a_bug_in_one_layer_fails_and_the_trace_names_the_layer(tiny_model, tmp_path, variant, bug):
    model_dir = tiny_model(variant)
    tp = 2 if bug == "rank_slices" else 1
    ckpt = convert(model_dir, tmp_path / "ok", tp_size=tp)
    edit = {"qk_head": lambda: _swap_one_qk_head_pair(tp), "gate_up": lambda: _swap_gate_up(tp),
            "rank_slices": lambda: _swap_rank_slices(ckpt)}[bug]()
    result = verify_checkpoint(corrupt(ckpt, tmp_path / "bad", edit), model_dir, token_ids=TOKENS)
    assert not result.passed
    failure = next(f for f in result.failures if f.figure == "max_layer_error")
    assert failure.layer == LAYER and f"max_layer_error {failure.value:.4g} (decoder layer {LAYER}) > 0.01" in failure.message
    assert result.trace.first_jump == LAYER and result.trace.worst_layer == LAYER
    others = [e.layer_error for e in result.trace.layers if e.layer != LAYER]
    assert max(others) < 1e-5  # the other layers are as exact as a correct conversion
    assert [e.cumulative_error > 1e-3 for e in result.trace.layers] == [False] * LAYER + [True] * (4 - LAYER)
    assert f"(decoder layer {LAYER})" in failure_summary(result)


def test_a_cast_checkpoint_passes_with_its_rounding_flat_across_layers(tiny_model, tmp_path):
    model_dir = tiny_model("gqa")  # float32 source, checkpoint in bfloat16: rounding in every layer
    result = verify_checkpoint(convert(model_dir, tmp_path / "bf16", dtype="bfloat16"), model_dir, token_ids=TOKENS)
    assert result.passed, failure_summary(result)
    errors = [e.layer_error for e in result.trace.layers]
    assert 1e-3 < min(errors) and max(errors) < 0.01 and result.trace.first_jump is None
