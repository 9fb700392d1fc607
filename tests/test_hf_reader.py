"""SourceCheckpoint: layouts, lazy slices, validation messages."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipe_runner.errors import SourceModelError
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint


@pytest.mark.parametrize("variant,files", [
    ("gqa", ["model.safetensors"]),
    ("sharded", None),  # the shards listed in the index
    ("bin", ["pytorch_model.bin"]),
])
def test_layouts_names_shapes_and_reads(variant, files, tiny_model, hf_tensors):
    model = tiny_model(variant)
    if files is None:
        index = json.loads((model / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 2
    src = SourceCheckpoint(model)
    ref = hf_tensors(model)
    assert [p.name for p in src.files] == files
    assert src.names() == sorted(ref)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert src.shape(name) == (64, 64) and src.dtype(name) == torch.float16
    assert torch.equal(src.read(name), ref[name])
    assert torch.equal(src.read(name, dim=0, start=8, stop=24), ref[name][8:24])
    cols = src.read(name, dim=1, start=16, stop=32)
    assert cols.is_contiguous() and torch.equal(cols, ref[name][:, 16:32])
    block = src.read_block(name, (slice(3, 5), slice(60, 64)))
    assert torch.equal(block, ref[name][3:5, 60:64])
    src.validate(read_model_config(model))


def test_reads_are_copies_not_views_of_the_file(tiny_model):
    src = SourceCheckpoint(tiny_model("gqa"))
    a = src.read("model.norm.weight")
    a.fill_(0)
    assert torch.count_nonzero(src.read("model.norm.weight")) == 64


def test_tied_model_has_no_lm_head_and_validates(tiny_model):
    model = tiny_model("tied")
    src = SourceCheckpoint(model)
    assert "lm_head.weight" not in src
    src.validate(read_model_config(model))


def test_untied_model_without_lm_head_fails(tiny_model, copy_model):
    model = copy_model(tiny_model("gqa"))
    tensors = load_file(model / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(SourceModelError, match=r"tensor 'lm_head.weight' is missing from "
                                               r"model.safetensors, but config.json describes a "
                                               r"LlamaForCausalLM that needs it"):
        SourceCheckpoint(model).validate(read_model_config(model))


def test_integer_weights_are_refused(tiny_model, copy_model):
    model = copy_model(tiny_model("gqa"))
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(SourceModelError, match=r"tensor 'model.norm.weight' has dtype "
                                               r"torch.int8; only unquantized"):
        SourceCheckpoint(model).validate(read_model_config(model))


def test_index_names_tensor_its_shard_lacks(tiny_model, copy_model):
    model = copy_model(tiny_model("sharded"))
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(SourceModelError) as e:
        SourceCheckpoint(model)
    assert str(e.value) == (
        f"{index_path} maps tensor 'model.layers.9.mlp.up_proj.weight' to "
        f"{shard}, but that shard does not contain it; the shards do "
        "not match the index — fetch them again")


def test_corrupt_header(tiny_model, copy_model):
    model = copy_model(tiny_model("gqa"))
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"XXXX"
    f.write_bytes(bytes(data))
    with pytest.raises(SourceModelError, match=r"model.safetensors has a corrupt safetensors "
                                               r"header; fetch this file again"):
        SourceCheckpoint(model)


def test_truncated_bin(tiny_model, copy_model):
    model = copy_model(tiny_model("bin"))
    f = model / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(SourceModelError, match=r"pytorch_model.bin cannot be loaded \(.*\); the "
                                               r"file is corrupt or truncated — fetch it again"):
        SourceCheckpoint(model)


def test_not_a_directory(tmp_path):
    with pytest.raises(SourceModelError, match="is not a directory"):
        SourceCheckpoint(tmp_path / "nope")


def test_stray_safetensors_without_index(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "consolidated.safetensors")
    with pytest.raises(SourceModelError, match=r"no weights found \(found "
                                               r"consolidated.safetensors without "
                                               r"model.safetensors.index.json\)"):
        SourceCheckpoint(tmp_path)
