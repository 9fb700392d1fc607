"""Quantized checkpoints: the exact tensor set of docs/format/trtllm-checkpoint.md for every algo ×
tp × kv, the config's quantization section, recipe builds end to end (cache reuse, worker-count
independence) and the errors a user can fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from recipe_runner.pipeline.build import run_build
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.lock import read_lock
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from tests.recipe_files import run_cli

ALGOS = ["none", "w8a16", "w4a16", "w4a16_awq", "w8a8_sq_per_channel", "w8a8_sq_per_channel_per_token",
         "w8a8_sq_per_tensor", "fp8"]
QUANT_ALGO = {"w8a16": "W8A16", "w4a16": "W4A16", "w4a16_awq": "W4A16_AWQ", "w8a8_sq_per_channel": "W8A8_SQ_PER_CHANNEL",
              "w8a8_sq_per_channel_per_token": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
              "w8a8_sq_per_tensor": "W8A8_SQ_PER_TENSOR_PLUGIN", "fp8": "FP8", "none": None}
F16, F32, I8, F8 = "F16", "F32", "I8", "F8_E4M3"


def expected_layer_tensors(algo: str, kv: str, tp: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-layer tensors of one rank, written from the tables of docs/format/trtllm-checkpoint.md §3, §4.2,
    §4.3, §4.6 and docs/format/verified-layouts.md for the quant_model fixture: H 128, I 256, 8 heads, 2 KV
    heads, head_dim 16, float16, group size 64."""
    H, I, d, g = 128, 256, 16, 64
    q, kvh = 8 // tp * d, max(2 // tp, 1) * d
    qkv, attn, inter = q + 2 * kvh, 8 * d // tp, I // tp
    outs = {"attention.qkv": qkv, "attention.dense": H, "mlp.fc": inter, "mlp.gate": inter, "mlp.proj": H}
    ins = {"attention.qkv": H, "attention.dense": attn, "mlp.fc": H, "mlp.gate": H, "mlp.proj": inter}
    row = {"attention.dense", "mlp.proj"}
    t = {"input_layernorm.weight": (F16, (H,)), "post_layernorm.weight": (F16, (H,))}
    for lin in outs:
        o, i = outs[lin], ins[lin]
        if algo in ("none", "w8a16", "w4a16"):  # model dtype; trtllm-build quantizes W8A16/W4A16
            t[f"{lin}.weight"] = (F16, (o, i))
        elif algo == "fp8":
            t.update({f"{lin}.weight": (F8, (o, i)), f"{lin}.weights_scaling_factor": (F32, (1,)),
                      f"{lin}.activation_scaling_factor": (F32, (1,))})
        elif algo == "w8a8_sq_per_channel":
            t.update({f"{lin}.weight": (I8, (o, i)), f"{lin}.weights_scaling_factor": (F32, (o,)),
                      f"{lin}.activation_scaling_factor": (F32, (1,)), f"{lin}.prequant_scaling_factor": (F16, (i,))})
        elif algo == "w4a16_awq":
            t.update({f"{lin}.weight": (I8, (o // 2, i)), f"{lin}.weights_scaling_factor": (F32, (o, i // g)),
                      f"{lin}.prequant_scaling_factor": (F16, (i,))})
        else:  # SmoothQuant plugin forms
            per_token = algo == "w8a8_sq_per_channel_per_token"
            scale_cols = o if per_token or lin == "attention.qkv" else 1
            t.update({f"{lin}.weight": (I8, (o, i)), f"{lin}.per_channel_scale": (F32, (1, scale_cols))})
            if not per_token:
                t[f"{lin}.act_scale"] = (F32, (1, 1))
            if lin in row:
                t[f"{lin}.smoother"] = (F32, (1, i))
    if algo in ("w8a8_sq_per_channel_per_token", "w8a8_sq_per_tensor"):
        t.update({"input_layernorm.scale_to_int": (F32, (1,)), "post_layernorm.scale_to_int": (F32, (1,))})
        if algo == "w8a8_sq_per_tensor":
            t.update({"attention.quantization_scaling_factor": (F32, (1,)),
                      "mlp.quantization_scaling_factor": (F32, (1,))})
    if kv != "none":
        t["attention.kv_cache_scaling_factor"] = (F32, (1,))
    return t


def _rank_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype code, shape), straight from the file header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


COMBOS = [(a, kv) for a in ALGOS for kv in ("none", "int8") if (a, kv) != ("none", "none")]


@pytest.fixture(scope="module")
def artifacts(quant_model, calibration, tmp_path_factory):
    """The quantize stage's output for every algo × kv (statistics computed once)."""
    from recipe_runner.quant.settings import QuantSettings
    from recipe_runner.stages.quantize import quantize_checkpoint

    stats, _ = calibration
    out = {}
    for algo, kv in COMBOS:
        d = tmp_path_factory.mktemp(f"q-{algo}-{kv}")
        out[(algo, kv)] = (d, quantize_checkpoint(quant_model, stats, QuantSettings(algo, kv, group_size=64), "float16", d))
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("algo, kv", COMBOS)
def test_checkpoint_holds_exactly_the_spec_tensor_set(artifacts, quant_model, tmp_path, algo, kv, tp):
    from recipe_runner.hf.config import read_model_config
    from recipe_runner.hf.layered import open_checkpoint
    from recipe_runner.stages.shard_plan import plan_rank_tensors
    from recipe_runner.stages.shard import write_checkpoint
    from recipe_runner.trtllm.mapping import ParallelMapping

    directory, artifact = artifacts[(algo, kv)]
    dirs = (directory, quant_model)
    manifest = plan_rank_tensors(read_model_config(quant_model), open_checkpoint(dirs), mapping=ParallelMapping(tp),
                            quantized=artifact)
    write_checkpoint(manifest, dirs, tmp_path / "ckpt")
    expected_layer = expected_layer_tensors(algo, kv, tp)
    for rank in range(tp):
        got = _rank_tensors(tmp_path / "ckpt" / f"rank{rank}.safetensors")
        want = {f"transformer.layers.{i}.{k}": v for i in range(4) for k, v in expected_layer.items()}
        want.update({"transformer.vocab_embedding.weight": (F16, (1001, 128)), "transformer.ln_f.weight": (F16, (128,)),
                     "lm_head.weight": (F16, (-(-1001 // tp), 128))})
        assert got == want
    quant = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"]
    assert list(quant) == ["quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                           "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules"]
    assert quant["quant_algo"] == QUANT_ALGO[algo]
    assert quant["kv_cache_quant_algo"] == {"none": None, "int8": "INT8"}[kv]
    assert (quant["group_size"], quant["pre_quant_scale"]) == ((64, True) if algo == "w4a16_awq" else (128, False))
    if algo == "none":
        assert quant["exclude_modules"] is None
    else:
        assert {"*lm_head", "*vocab_embedding", "lm_head"} <= set(quant["exclude_modules"])


def test_sharded_tensors_reassemble_to_the_unsharded_ones(artifacts, quant_model, tmp_path):
    """tp 2 rank files are cut from the tp 1 tensors: column-parallel rows, row-parallel columns,
    packed int4 rows halved, per-row scales with their rows, prequant/smoother with the input split."""
    from recipe_runner.hf.config import read_model_config
    from recipe_runner.hf.layered import open_checkpoint
    from recipe_runner.stages.shard_plan import plan_rank_tensors
    from recipe_runner.stages.shard import write_checkpoint
    from recipe_runner.trtllm.mapping import ParallelMapping
    from tests.conftest import load_ranks

    for algo in ("w4a16_awq", "w8a8_sq_per_channel_per_token"):
        directory, artifact = artifacts[(algo, "none")]
        dirs = (directory, quant_model)
        for tp in (1, 2):
            m = plan_rank_tensors(read_model_config(quant_model), open_checkpoint(dirs), mapping=ParallelMapping(tp),
                             quantized=artifact)
            write_checkpoint(m, dirs, tmp_path / f"{algo}-{tp}")
        _, (whole,) = load_ranks(tmp_path / f"{algo}-1")
        _, parts = load_ranks(tmp_path / f"{algo}-2")
        p = "transformer.layers.1."
        for name, dim in (("mlp.fc.weight", 0), ("mlp.proj.weight", 1), ("attention.dense.weight", 1)):
            assert torch.equal(torch.cat([r[p + name] for r in parts], dim), whole[p + name])
        if algo == "w4a16_awq":
            for name, dim in (("mlp.gate.weights_scaling_factor", 0), ("mlp.proj.weights_scaling_factor", 1),
                              ("mlp.proj.prequant_scaling_factor", 0)):
                assert torch.equal(torch.cat([r[p + name] for r in parts], dim), whole[p + name])
            assert all(torch.equal(r[p + "mlp.fc.prequant_scaling_factor"], whole[p + "mlp.fc.prequant_scaling_factor"])
                       for r in parts)
        else:
            for name, dim in (("mlp.fc.per_channel_scale", 1), ("mlp.proj.smoother", 1)):
                assert torch.equal(torch.cat([r[p + name] for r in parts], dim), whole[p + name])
            assert all(torch.equal(r[p + "mlp.proj.per_channel_scale"], whole[p + "mlp.proj.per_channel_scale"])
                       for r in parts)


# ---- recipe builds ---------------------------------------------------------------------------------

RECIPE = """\
recipe_version: 1
name: {name}
source:
  path: {model}
  dtype: float16
mapping:
  tp_size: {tp}
quantization:
  algo: {algo}
  kv_cache: {kv}
  smoothquant_alpha: {alpha}
  group_size: 64
  exclude_modules: {exclude}
  calibration:
    dataset: {dataset}
    num_samples: 8
    max_seq_len: 24
    batch_size: 4
output:
  dir: {out}
workers: {workers}
"""


def write_recipe(tmp_path: Path, model: Path, dataset: Path | str, *, algo="w8a8_sq_per_channel_per_token", kv="int8",
                 alpha=0.5, tp=2, out="out", workers=1, exclude="[lm_head]", name="q") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name, model=model, tp=tp, algo=algo, kv=kv, alpha=alpha, dataset=dataset,
                                  out=tmp_path / out, workers=workers, exclude=exclude))
    return path


def build(recipe: Path, store: CacheStore, **kwargs):
    result = run_build(make_plan(load_recipe(recipe)), store=store, echo=lambda _: None, **kwargs)
    return result, {t["stage"]: t["action"] for t in result.trace}


def test_quantized_recipe_builds_and_alpha_reuses_calibration(quant_model, calib_file, tmp_path):
    store = CacheStore(tmp_path / "cache")
    first, actions = build(write_recipe(tmp_path, quant_model, calib_file), store)
    assert actions == {"convert": "ran", "calibrate": "ran", "quantize": "ran", "shard": "ran"}
    config = json.loads((first.output_dir / "checkpoint" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert config["quantization"]["smoothquant_val"] == 0.5
    _, actions = build(write_recipe(tmp_path, quant_model, calib_file, alpha=0.8), store)
    assert actions == {"convert": "cached", "calibrate": "cached", "quantize": "ran", "shard": "ran"}
    _, actions = build(write_recipe(tmp_path, quant_model, calib_file, alpha=0.8, tp=1), store)
    assert actions == {"convert": "cached", "calibrate": "cached", "quantize": "cached", "shard": "ran"}


def test_worker_count_and_reruns_give_identical_bytes(quant_model, calib_file, tmp_path):
    one, _ = build(write_recipe(tmp_path, quant_model, calib_file, algo="w4a16_awq", out="one"), CacheStore(tmp_path / "c1"))
    two, _ = build(write_recipe(tmp_path, quant_model, calib_file, algo="w4a16_awq", out="two", workers=2),
                   CacheStore(tmp_path / "c2"))
    assert read_lock(one.lock_path).outputs == read_lock(two.lock_path).outputs
    assert read_lock(one.lock_path).stages == read_lock(two.lock_path).stages


def test_exclude_modules_keeps_those_linears_in_the_model_dtype(quant_model, calib_file, tmp_path):
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo="fp8", kv="fp8", tp=1,
                          exclude='[lm_head, "transformer.layers.0.mlp.*"]')
    result, _ = build(recipe, CacheStore(tmp_path / "cache"))
    ckpt = result.output_dir / "checkpoint"
    with safe_open(str(ckpt / "rank0.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("transformer.layers.0.mlp.fc.weight").dtype == torch.float16
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("transformer.layers.1.mlp.fc.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    assert "transformer.layers.0.mlp.fc.weights_scaling_factor" not in names
    assert "transformer.layers.1.mlp.fc.weights_scaling_factor" in names
    exclude = json.loads((ckpt / "config.json").read_text())["quantization"]["exclude_modules"]
    assert "transformer.layers.0.mlp.*" in exclude and "transformer.layers.0.mlp.*.weight" in exclude


# ---- errors ----------------------------------------------------------------------------------------

def _cli_build(capsys, recipe: Path, tmp_path: Path) -> tuple[int, str]:
    code, _, err = run_cli(capsys, "build", str(recipe), "--cache-dir", str(tmp_path / "cache"))
    return code, err


def test_missing_calibration_file(quant_model, tmp_path, capsys):
    code, err = _cli_build(capsys, write_recipe(tmp_path, quant_model, "nothing-here.jsonl"), tmp_path)
    assert code == 2
    assert f"quantization.calibration.dataset: calibration file {tmp_path / 'nothing-here.jsonl'} not found" in err


def test_empty_calibration_file(quant_model, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    code, err = _cli_build(capsys, write_recipe(tmp_path, quant_model, "empty.txt"), tmp_path)
    assert code == 2 and f"{tmp_path / 'empty.txt'} holds no calibration samples" in err


def test_source_without_tokenizer(tiny_model, calib_file, tmp_path, capsys):
    model = tiny_model(hidden_size=128, intermediate_size=256)  # no tokenizer files
    code, err = _cli_build(capsys, write_recipe(tmp_path, model, calib_file), tmp_path)
    assert code == 2
    assert f"q.yaml:15:5: quantization.calibration: the source model directory {model} has no tokenizer" in err


@pytest.mark.parametrize("overrides, message", [
    ({"algo": "fp8", "kv": "int8"}, "q.yaml:10:13: quantization.kv_cache: algo fp8 with kv_cache int8 is not supported"),
    ({"algo": "w4a16_awq", "tp": 4}, "group_size=64 x tp_size=4 does not divide the model's hidden_size=128"),
    ({"algo": "fp8", "kv": "fp8", "exclude": "[lm_head, model.layers.0.mlp.down_proj]"},
     "pattern 'model.layers.0.mlp.down_proj' matches no module of this model"),
    ({"exclude": "[lm_head, '*.mlp.proj']"},
     "the SmoothQuant plugin form (w8a8_sq_per_channel_per_token) quantizes every decoder layer"),
])
def test_recipe_errors_are_located(quant_model, calib_file, tmp_path, capsys, overrides, message):
    code, _, err = run_cli(capsys, "plan", str(write_recipe(tmp_path, quant_model, calib_file, **overrides)))
    assert code == 2 and message in err, err


def test_layer_indexed_exclusions_must_survive_pipeline_stages(quant_model, calib_file, tmp_path, capsys):
    recipe = write_recipe(tmp_path, quant_model, calib_file, algo="fp8", kv="none", exclude='[lm_head, "transformer.layers.2.*"]')
    text = recipe.read_text().replace("  tp_size: 2\n", "  tp_size: 1\n  pp_size: 2\n")
    recipe.write_text(text)
    code, _, err = run_cli(capsys, "plan", str(recipe))
    assert code == 2 and "trtllm-build matches exclude patterns against pipeline-local layer indices" in err
