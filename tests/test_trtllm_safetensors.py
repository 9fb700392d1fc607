"""Streaming safetensors writer."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recipe_runner.io.safetensors_writer import (
    FileRange,
    SafetensorsStreamWriter,
    TensorSpec,
    plan_layout,
    write_safetensors,
)


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w16": torch.randn(3, 5, generator=g).half(),
        "wbf": torch.randn(7, generator=g).bfloat16(),
        "w32": torch.randn(2, 2, generator=g),
        "i8": torch.randint(-100, 100, (9,), generator=g, dtype=torch.int8),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "z": torch.zeros(0, 4, dtype=torch.float16),
    }


def test_bytes_identical_to_reference_save_file(tmp_path):
    tensors = sample()
    save_file(tensors, tmp_path / "ref.safetensors")
    write_safetensors(tmp_path / "mine.safetensors", tensors)
    mine, ref = tmp_path / "mine.safetensors", tmp_path / "ref.safetensors"
    assert mine.read_bytes() == ref.read_bytes()
    loaded = load_file(tmp_path / "mine.safetensors")
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()
               if v.dtype != torch.float8_e4m3fn)


def test_header_known_before_data():
    layout = plan_layout([TensorSpec("b", torch.float16, (2, 3)),
                          TensorSpec("a", torch.float32, (4,))])
    assert [s.name for s in layout.order] == ["a", "b"]  # wider dtype first, like save_file
    assert dict(layout.offsets) == {"a": (0, 16), "b": (16, 28)}
    assert len(layout.prefix) % 8 == 0 and layout.file_size == len(layout.prefix) + 28


def test_keep_order_writes_the_given_order_and_loads_the_same(tmp_path):
    tensors = sample()
    names = ["z", "i8", "w16", "scalar", "f8", "wbf", "w32"]
    specs = [TensorSpec(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    path = tmp_path / "kept.safetensors"
    with SafetensorsStreamWriter(path, specs, keep_order=True) as w:
        assert [s.name for s in w.layout.order] == names
        for n in names:
            w.write(n, tensors[n])
    loaded = load_file(path)
    assert [n for n, _ in sorted(w.layout.offsets.items(), key=lambda kv: kv[1])] == names
    assert all(torch.equal(loaded[n].reshape(-1).view(torch.uint8), tensors[n].reshape(-1).view(torch.uint8))
               for n in names)


def test_blocks_stream_into_one_tensor(tmp_path):
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, [TensorSpec("t", torch.float32, (10, 4))]) as w:
        w.write_blocks("t", [t[:3], t[3:9], t[9:]])
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_final_name_only_when_complete(tmp_path):
    path = tmp_path / "rank0.safetensors"
    specs = [TensorSpec("a", torch.float16, (2,)), TensorSpec("b", torch.float16, (2,))]
    w = SafetensorsStreamWriter(path, specs)
    w.write("a", torch.ones(2, dtype=torch.float16))
    assert not path.exists() and (tmp_path / "rank0.safetensors.partial").exists()
    with pytest.raises(ValueError, match=r"not all tensors written \(missing \['b'\]"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_exception_in_with_block_removes_partial(tmp_path):
    path = tmp_path / "r.safetensors"
    with pytest.raises(RuntimeError):
        with SafetensorsStreamWriter(path, [TensorSpec("a", torch.float16, (2,))]):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rejects_wrong_order_shape_dtype_and_size(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float16, (2,))]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected tensor a next, got b"):
        w.write("b", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"a: shape \(3,\) != planned \(2,\)"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="a: block dtype torch.float16 != planned torch.float32"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="a: more bytes than its planned shape"):
        w.write_blocks("a", [torch.zeros(2), torch.zeros(1)])
    w.abort()
    with pytest.raises(ValueError, match="duplicate tensor names: a"):
        plan_layout([specs[0], specs[0]])


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_file_ranges_are_copied_verbatim(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # e.g. an old kernel or two file systems: pread + write instead
        import errno
        import os

        def unsupported(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    src = tmp_path / "src.bin"
    payload = torch.arange(100, dtype=torch.float16)
    src.write_bytes(b"junk" + payload.numpy().tobytes())
    path = tmp_path / "x.safetensors"
    with SafetensorsStreamWriter(path, [TensorSpec("t", torch.float16, (2, 50))]) as w:
        # rows 0..19 from the file, 20..49 as a tensor, then the second row from the file
        w.write_blocks("t", [FileRange(src, 4, 40), payload[20:50],
                             FileRange(src, 4 + 100, 100)])
    assert torch.equal(load_file(path)["t"], payload.reshape(2, 50))


def test_file_range_past_end_of_source(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\0" * 10)
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorSpec("t", torch.uint8, (20,))])
    with pytest.raises(OSError, match="ended before byte"):
        w.write_blocks("t", [FileRange(src, 0, 20)])
    w.abort()
