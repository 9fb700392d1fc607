"""quant/chunks.py: map_row_chunks runs every row chunk once, on the pool (one thread per core) with
torch's intra-op threads at 1, restores them, propagates errors, runs nested calls in place; and the
quantization passes built on it give the bytes of the whole-tensor formulas they replaced."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from recipe_runner.quant import chunks

POOL = chunks.cores() > 1  # a 1-core machine runs every chunk in the calling thread


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(chunks, "CODE_ELEMENTS", 100)


def _record(rows: int, cols: int, **kw) -> tuple[torch.Tensor, set[str], set[int]]:
    seen = torch.zeros(rows, dtype=torch.int64)
    names, threads, lock = set(), set(), threading.Lock()

    def fn(s: slice) -> None:
        with lock:
            seen[s] += 1
            names.add(threading.current_thread().name)
            threads.add(torch.get_num_threads())

    chunks.map_row_chunks(fn, rows, cols, **kw)
    return seen, names, threads


def test_row_slices_read_the_chunk_size_when_called(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 10)
    assert list(chunks.row_slices(7, 4)) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    assert list(chunks.row_slices(3, 4, elements=100)) == [slice(0, 3)]
    assert list(chunks.row_slices(2, 50)) == [slice(0, 1), slice(1, 2)]  # at least a row


@pytest.mark.parametrize("rows, cols", [(0, 5), (1, 5), (1, 1000), (7, 3), (1000, 17), (5, 250), (333, 1)])
def test_every_row_exactly_once(small, rows, cols):
    before = torch.get_num_threads()
    seen, names, threads = _record(rows, cols)
    assert seen.tolist() == [1] * rows
    assert torch.get_num_threads() == before
    if POOL and len(list(chunks.row_slices(rows, cols, 100))) > 1:
        assert all(n.startswith(chunks.THREAD_PREFIX) for n in names) and threads == {1}
    elif rows:
        assert names == {threading.current_thread().name}


def test_one_core_and_other_devices_run_in_the_calling_thread(small, monkeypatch):
    here = {threading.current_thread().name}
    seen, names, _ = _record(50, 10, device=torch.device("meta"))  # a GPU's chunks: CHUNK_ELEMENTS, in order
    assert seen.tolist() == [1] * 50 and names == here
    monkeypatch.setattr(chunks, "cores", lambda: 1)
    before = torch.get_num_threads()
    seen, names, threads = _record(50, 10)
    assert seen.tolist() == [1] * 50 and names == here and threads == {before}


def test_the_first_error_propagates_and_no_chunk_outlives_the_call(small):
    ran = []

    def fn(s: slice) -> None:
        if s.start == 30:
            raise ValueError(f"bad rows {s.start}")
        time.sleep(0.001)
        ran.append(s.start)

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="bad rows 30"):
        chunks.map_row_chunks(fn, 200, 10)
    done = len(ran)
    time.sleep(0.05)
    assert len(ran) == done and torch.get_num_threads() == before


def test_a_nested_call_runs_in_its_pool_thread_without_deadlock(small):
    inner: list[tuple[str, str]] = []
    seen = torch.zeros(40, 40, dtype=torch.int64)

    def outer(s: slice) -> None:
        name = threading.current_thread().name

        def cell(c: slice) -> None:
            inner.append((name, threading.current_thread().name))
            seen[s, c] += 1

        chunks.map_row_chunks(cell, 40, 10)

    worker = threading.Thread(target=chunks.map_row_chunks, args=(outer, 40, 10))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "nested map_row_chunks deadlocked"
    assert bool((seen == 1).all()) and all(a == b for a, b in inner)


def test_concurrent_callers_from_two_threads(small):
    before = torch.get_num_threads()
    results, after = {}, {}

    def caller(key: int) -> None:
        out = torch.zeros(300, 8)

        def fn(s: slice) -> None:
            time.sleep(0.0005)
            out[s] = torch.arange(s.start, s.stop, dtype=torch.float32)[:, None] * key

        chunks.map_row_chunks(fn, 300, 8)
        results[key] = out
        after[key] = torch.get_num_threads()

    threads = [threading.Thread(target=caller, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for key in (1, 2):
        assert torch.equal(results[key], torch.arange(300, dtype=torch.float32)[:, None].expand(300, 8) * key)
    assert torch.get_num_threads() == before
    assert after == {1: before, 2: before}  # each caller's own count too, whichever finished first


def test_scratch_buffers_are_reused_per_thread_and_name():
    a = chunks.scratch("t1", (4, 5), torch.float32, torch.device("cpu"))
    b = chunks.scratch("t1", (2, 3), torch.float32, torch.device("cpu"))
    c = chunks.scratch("t2", (2, 3), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and c.data_ptr() != a.data_ptr() and b.shape == (2, 3)
    other = {}
    t = threading.Thread(target=lambda: other.update(p=chunks.scratch("t1", (4, 5), torch.float32, "cpu").data_ptr()))
    t.start()
    t.join()
    assert other["p"] != a.data_ptr()


# ---- the passes built on map_row_chunks: the bytes of the whole-tensor formulas -----------------------

@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of a few rows, so these small tensors go through several chunks and pool threads."""
    monkeypatch.setattr(chunks, "CODE_ELEMENTS", 1000)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 3000)


def _weight(rows: int = 203, cols: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen).mul(4)
    w[5] = 0.0  # an all-zero row and block
    w[7, :16] = torch.tensor([6.0, -6.0, 0.25, -0.25, 5.0, 2.5, 1.75, 0.75] * 2)
    return w.to(torch.bfloat16).float()


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_nvfp4_scales_codes_and_packing(tiny_chunks):
    from recipe_runner.quant import nvfp4

    w = _weight()
    ws2 = nvfp4.global_scale(float(w.abs().max()))
    blocks = w.reshape(w.shape[0], -1, nvfp4.BLOCK)
    want_scales = (blocks.abs().amax(dim=2) / (6 * ws2)).clamp(2.0 ** -9, 448).to(torch.float8_e4m3fn)
    scales = nvfp4.block_scales(w, ws2)
    assert _bytes(scales) == _bytes(want_scales)
    denom = scales.float() * ws2
    want_codes = nvfp4._e2m1_rounding(blocks / denom[:, :, None]).reshape(w.shape)
    codes = nvfp4.quantize(w, scales, ws2)
    assert torch.equal(codes, want_codes)
    assert torch.equal(nvfp4.pack(codes), codes[:, 0::2] | (codes[:, 1::2] << 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(w[:, :40], scales, ws2)


def test_fp8_codes(tiny_chunks):
    from recipe_runner.quant.fp8 import fp8_scale, quantize_fp8

    w = (_weight(seed=1) * 100).to(torch.bfloat16).float()  # exact in bfloat16 too
    scale = fp8_scale(float(w.abs().max()) / 2)  # half the range saturates
    want = (w / scale.reshape(())).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert _bytes(quantize_fp8(w, scale)) == _bytes(want)
    assert _bytes(quantize_fp8(w.to(torch.bfloat16), scale)) == _bytes(want)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_int_codes(tiny_chunks, granularity):
    from recipe_runner.quant.weight_only import INT4, INT8, int_codes

    w = _weight(seed=2)
    for fmt in (INT8, INT4):
        if granularity == "tensor":
            scale = w.abs().max() / fmt.qmax
            q = w / scale
        elif granularity == "channel":
            scale = (w.abs().amax(dim=1) / fmt.qmax).clamp(min=1e-30)
            q = w / scale[:, None]
        else:
            scale = (w.reshape(203, -1, 32).abs().amax(dim=2) / fmt.qmax).clamp(min=1e-30)
            q = (w.reshape(203, -1, 32) / scale[:, :, None]).reshape(w.shape)
        want = q.round().clamp(fmt.qmin, fmt.qmax).to(torch.int8)
        assert torch.equal(int_codes(w, scale, fmt), want)


def test_int_packings(tiny_chunks):
    from recipe_runner.quant.packing import pack_int32, pack_int4_rows

    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-8, 8, (204, 96), generator=gen, dtype=torch.int8)
    for bits in (4, 8):
        c = codes if bits == 4 else torch.randint(-128, 128, (204, 96), generator=gen, dtype=torch.int8)
        per = 32 // bits
        unsigned = (c.to(torch.int64) + (1 << (bits - 1))).reshape(204, -1, per)
        words = (unsigned << (torch.arange(per) * bits)).sum(dim=2)
        want = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        assert torch.equal(pack_int32(c, bits), want)
    for c in (codes, codes.reshape(204, 8, 12), codes[:0], codes[:, :1].reshape(204)):
        nibbles = c.to(torch.int16) & 0x0F
        want = (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8).view(torch.int8)
        assert torch.equal(pack_int4_rows(c), want)


def test_column_absmax(tiny_chunks):
    from recipe_runner.quant.smoothquant import column_absmax

    w = _weight(rows=203, seed=5)
    for t in (w, w.to(torch.bfloat16), w[:1], w[:2], w[:3]):
        assert _bytes(column_absmax(t)) == _bytes(t.abs().amax(dim=0).float())


def test_bin_source_rows_read_from_every_pool_thread(tiny_chunks, tmp_path):
    """A .bin source's state dict is cached per file and swapped under a lock: concurrent row reads of two
    files, alternating, each get their own tensor's rows."""
    from recipe_runner.hf.reader import SourceCheckpoint

    a, b = _weight(rows=120, seed=6), _weight(rows=120, seed=7)
    torch.save({"a": a}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                            "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(__import__("json").dumps(index))
    reader = SourceCheckpoint(tmp_path)
    got = {"a": torch.empty_like(a), "b": torch.empty_like(b)}

    def rows(s: slice) -> None:
        for name in ("a", "b") if s.start % 2 else ("b", "a"):
            got[name][s] = reader.rows(name, s.start, s.stop)
            if s.start % 3 == 0:
                reader.release()

    chunks.map_row_chunks(rows, 120, 96)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
