"""Bad inputs and failing disks: each gives one clear error and leaves no checkpoint behind."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipe_runner.api import convert
from recipe_runner.errors import SourceModelError, UserError
from recipe_runner.trtllm.mapping import ParallelMapping


def test_missing_config_json(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    (model / "config.json").unlink()
    with pytest.raises(SourceModelError) as e:
        convert(model, tmp_path / "out")
    assert str(e.value).startswith(f"{model / 'config.json'} not found")
    assert not (tmp_path / "out").exists()


def test_missing_weights(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    (model / "model.safetensors").unlink()
    with pytest.raises(SourceModelError, match="no weights found; expected model.safetensors"):
        convert(model, tmp_path / "out")


def test_truncated_safetensors(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    f = model / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(SourceModelError) as e:
        convert(model, tmp_path / "out")
    assert str(e.value) == (
        f"{f} is truncated: its header describes {size} bytes but the file has {size - 1000}; "
        "the download or copy is incomplete — fetch this file again")
    assert not (tmp_path / "out").exists()


def test_truncated_inside_header(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    f = model / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(SourceModelError, match=r"model.safetensors is truncated: its header "
                                               r"describes \d+ bytes but the file has 100"):
        convert(model, tmp_path / "out")


def test_index_points_at_missing_shard(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("sharded"))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (model / shard).unlink()
    with pytest.raises(SourceModelError) as e:
        convert(model, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith(f"{model / 'model.safetensors.index.json'} maps tensor '")
    assert f"to shard '{shard}', which is missing from {model}; download all shards" in msg


def test_tensor_with_unexpected_shape(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    f = model / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(8, 64, dtype=torch.float16)
    save_file(tensors, f)
    with pytest.raises(SourceModelError) as e:
        convert(model, tmp_path / "out")
    assert str(e.value) == (
        f"{f}: tensor 'model.layers.2.self_attn.k_proj.weight' has shape [8, 64] but "
        "config.json implies [16, 64]; the weights do not match config.json")


def test_missing_tensor(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    f = model / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(SourceModelError, match=r"tensor 'model.layers.3.mlp.up_proj.weight' is "
                                               r"missing from model.safetensors"):
        convert(model, tmp_path / "out")


def test_unsupported_architecture(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("gqa"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceModelError) as e:
        convert(model, tmp_path / "out")
    assert str(e.value) == (f"{model / 'config.json'}: unsupported architecture "
                            "'Qwen2ForCausalLM'; supported: LlamaForCausalLM, MistralForCausalLM")


def test_tp_not_dividing_heads(tiny_model, tmp_path):
    with pytest.raises(UserError) as e:
        convert(tiny_model("gqa"), tmp_path / "out", tp_size=3)
    assert str(e.value) == (
        "mapping.tp_size: tp_size=3 does not divide num_attention_heads=8 (allowed: 1, 2, 4, 8)\n"
        "mapping.tp_size: tp_size=3 does not divide intermediate_size=128 (allowed: 1, 2, 4, 8)")
    assert not (tmp_path / "out").exists()


def test_pp_larger_than_layers(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"^mapping.pp_size: pp_size=5 exceeds "
                                        r"num_hidden_layers=4; .*\(allowed: 1 to 4\)$"):
        convert(tiny_model("gqa"), tmp_path / "out", pp_size=5)


def test_bad_dtype(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"dtype 'int8' is not supported \(allowed: auto, "
                                        r"float16, bfloat16, float32\)"):
        convert(tiny_model("gqa"), tmp_path / "out", dtype="int8")


def test_fp16_overflow_is_refused(tiny_model, copy_model, tmp_path):
    model = copy_model(tiny_model("bf16"))
    f = model / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"][3] = 2.0**20  # exact in bf16
    save_file(tensors, f)
    with pytest.raises(UserError, match=r"tensor transformer.ln_f.weight: values up to 1.049e\+06 "
                                        r"overflow float16 \(max 65504\); convert with dtype "
                                        r"bfloat16 or float32"):
        convert(model, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()
    convert(model, tmp_path / "out", dtype="bfloat16")  # fine in a dtype that holds it


def _fail_writes_after(monkeypatch, n_ok: int) -> None:
    """The disk fills up after `n_ok` writes (user-space writes and kernel copies alike)."""
    from recipe_runner.io import safetensors_writer

    calls = {"n": 0}

    def failing(real):
        def wrapper(f, data):
            calls["n"] += 1
            if calls["n"] > n_ok:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(f, data)
        return wrapper

    for name in ("_write_all", "_copy_range"):
        monkeypatch.setattr(safetensors_writer, name, failing(getattr(safetensors_writer, name)))


def test_enospc_leaves_no_checkpoint(tiny_model, tmp_path, monkeypatch):
    _fail_writes_after(monkeypatch, n_ok=40)  # rank 0 completes, rank 1 fails part-way
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        convert(tiny_model("gqa"), out, tp_size=2)
    assert str(e.value).startswith(f"no space left on device writing {out / 'rank1.safetensors'} (")
    assert "nothing was published" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no out dir, no temp dir, no partial files


def test_enospc_keeps_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("gqa")
    out = convert(model, tmp_path / "out", tp_size=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_writes_after(monkeypatch, n_ok=3)
    with pytest.raises(UserError, match="no space left on device writing"):
        convert(model, out, tp_size=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_to_replace_unrelated_directory(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"holds files that are not part of a TensorRT-LLM "
                                        r"checkpoint \(notes.txt\); refusing to replace it"):
        convert(tiny_model("gqa"), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_source_changed_after_planning(tiny_model, copy_model, tmp_path):
    from recipe_runner.stages.shard_plan import plan_convert
    from recipe_runner.stages.shard import write_checkpoint

    model = copy_model(tiny_model("gqa"))
    manifest = plan_convert(model, mapping=ParallelMapping(tp_size=2))
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(SourceModelError, match=r"tensor 'model.norm.weight' is float32 \[64\] "
                                               r"but was float16 \[64\] when the conversion was "
                                               r"planned; the source changed — plan again"):
        write_checkpoint(manifest, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_worker_failure_propagates(tiny_model, copy_model, tmp_path):
    """An error inside a worker process reaches the caller as the same UserError."""
    from recipe_runner.stages.shard_plan import plan_convert
    from recipe_runner.stages.shard import write_checkpoint

    model = copy_model(tiny_model("gqa"))
    manifest = plan_convert(model, mapping=ParallelMapping(tp_size=2))
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(SourceModelError, match="the source changed"):
        write_checkpoint(manifest, model, tmp_path / "out", workers=2)
    assert list(tmp_path.iterdir()) == [model]
