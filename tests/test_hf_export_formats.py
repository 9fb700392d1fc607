"""Quantized HF checkpoints (docs/format/hf-quantized-checkpoint.md §1.3, §1.4, §2.3, §3): tensor names,
dtypes and shapes, dequantization within one step, re-quantization reproducing the codes, config files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.hfexport.export import export_checkpoint
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.quant import nvfp4
from tests.conftest import load_hf_tensors
from tests.dequantize import unpack_int32

H, I, D, G = 128, 256, 16, 64
OUT = {"self_attn.q_proj": 8 * D, "self_attn.k_proj": 2 * D, "self_attn.v_proj": 2 * D, "self_attn.o_proj": H,
       "mlp.gate_proj": I, "mlp.up_proj": I, "mlp.down_proj": H}
IN = {p: (8 * D if p == "self_attn.o_proj" else I if p == "mlp.down_proj" else H) for p in OUT}
FOLDED = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
          "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
          "mlp.up_proj": "post_attention_layernorm"}
F32, F8, U8, I8, F16 = torch.float32, torch.float8_e4m3fn, torch.uint8, torch.int8, torch.float16
PAIRS = [("hf-modelopt", "fp8", "fp8"), ("hf-modelopt", "w8a16", "none"), ("hf-modelopt", "w4a16_awq", "fp8"),
         ("hf-modelopt", "nvfp4", "none"), ("hf-compressed-tensors", "w8a16", "none"),
         ("hf-compressed-tensors", "w4a16", "none"), ("hf-compressed-tensors", "w4a16_awq", "fp8"),
         ("hf-compressed-tensors", "nvfp4", "fp8"), ("hf-compressed-tensors", "w8a8_sq_per_channel", "none"),
         ("hf-compressed-tensors", "w8a8_sq_per_channel_per_token", "none")]


def expected(target, algo, proj):
    o, i = OUT[proj], IN[proj]
    ct = target == "hf-compressed-tensors"
    if algo == "fp8":
        return {"weight": (F8, (o, i)), "weight_scale": (F32, ()), "input_scale": (F32, ())}
    if algo == "nvfp4":
        if ct:
            return {"weight_packed": (U8, (o, i // 2)), "weight_scale": (F8, (o, i // 16)),
                    "weight_global_scale": (F32, (1,)), "input_global_scale": (F32, (1,))}
        return {"weight": (U8, (o, i // 2)), "weight_scale": (F8, (o, i // 16)), "weight_scale_2": (F32, ()),
                "input_scale": (F32, ())}
    if ct and algo.startswith("w8a8"):
        t = {"weight": (I8, (o, i)), "weight_scale": (F32, (o, 1))}
        return {**t, "input_scale": (F32, (1,))} if algo == "w8a8_sq_per_channel" else t
    if ct:
        bits = 8 if algo == "w8a16" else 4
        return {"weight_packed": (torch.int32, (o, i * bits // 32)),
                "weight_scale": (F16, (o, i // G if algo == "w4a16_awq" else 1)), "weight_shape": (torch.int64, (2,))}
    if algo == "w8a16":
        return {"weight": (I8, (o, i)), "weight_scale": (F32, (o,))}
    t = {"weight": (U8, (o // 2, i)), "weight_scale": (F32, (o, i // G))}
    return t if proj in FOLDED else {**t, "pre_quant_scale": (F16, (i,))}


@pytest.fixture
def exported(hf_exported):
    return hf_exported


def _unpack_rows(packed):  # int4 along out, row 2i low nibble, signed
    b = packed.to(torch.int16)
    lo, hi = b & 15, b >> 4
    lo, hi = torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], 1).reshape(-1, packed.shape[1]).float()


def _dequant(target, algo, t, pre):
    """(effective weight W', one step per element, codes) in the smoothed space; codes as floats."""
    ct = target == "hf-compressed-tensors"
    if algo == "fp8":
        q, ws = t[pre + "weight"].float(), t[pre + "weight_scale"]
        return q * ws, q.abs() * ws / 8 + ws * 2 ** -6, q
    if algo == "nvfp4":
        packed = t[pre + ("weight_packed" if ct else "weight")]
        ws2 = 1 / t[pre + "weight_global_scale"] if ct else t[pre + "weight_scale_2"]
        codes, bs = nvfp4.unpack(packed), t[pre + "weight_scale"]
        step = (2 * bs.float() * ws2).repeat_interleave(16, 1)
        return nvfp4.dequantize(codes, bs, ws2), step, codes.float()
    if ct and algo.startswith("w8a8") or (not ct and algo == "w8a16"):
        q, s = t[pre + "weight"].float(), t[pre + "weight_scale"].float().reshape(-1, 1)
        return q * s, s.expand_as(q), q
    if ct:
        q = unpack_int32(t[pre + "weight_packed"], 8 if algo == "w8a16" else 4).float()
        s = t[pre + "weight_scale"].float().repeat_interleave(q.shape[1] // t[pre + "weight_scale"].shape[1], 1)
        return q * s, s, q
    q = _unpack_rows(t[pre + "weight"])
    s = t[pre + "weight_scale"].repeat_interleave(G, 1)
    return q * s, s, q


def _requant(target, algo, w, t, pre):
    ct = target == "hf-compressed-tensors"
    if algo == "fp8":
        return (w / t[pre + "weight_scale"]).clamp(-448, 448).to(F8).float()
    if algo == "nvfp4":
        ws2 = 1 / t[pre + "weight_global_scale"] if ct else t[pre + "weight_scale_2"]
        return nvfp4.quantize(w, t[pre + "weight_scale"], ws2).float()
    _, s, _ = _dequant(target, algo, t, pre)
    bits = 4 if algo in ("w4a16", "w4a16_awq") else 8
    return (w / s).round().clamp(-(1 << bits - 1), (1 << bits - 1) - 1)


@pytest.mark.parametrize("target, algo, kv", PAIRS)
def test_tensors_dequantize_and_requantize_as_the_spec_says(exported, quant_model, target, algo, kv):
    out = exported(target, algo, kv)
    t = load_file(out / "model.safetensors")
    src = {k: v.to(F16).float() for k, v in load_hf_tensors(quant_model).items()}
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(4):
        for n in ("input_layernorm", "post_attention_layernorm"):
            want.add(f"model.layers.{layer}.{n}.weight")
        for proj in OUT:
            pre = f"model.layers.{layer}.{proj}."
            spec = expected(target, algo, proj)
            for suffix, (dt, shape) in spec.items():
                assert t[pre + suffix].dtype == dt and tuple(t[pre + suffix].shape) == shape, (pre + suffix)
                want.add(pre + suffix)
            w = src[pre + "weight"]
            pqs = torch.ones(IN[proj])
            if proj in FOLDED and (algo == "w4a16_awq" or algo.startswith("w8a8")):
                norm = f"model.layers.{layer}.{FOLDED[proj]}.weight"
                pqs = t[norm].float() / src[norm]
            elif "pre_quant_scale" in spec:
                pqs = t[pre + "pre_quant_scale"].float()
            w_eff, step, codes = _dequant(target, algo, t, pre)
            assert ((w_eff - w / pqs).abs() <= step * 1.001 + 1e-7).all(), pre
            same = (_requant(target, algo, w / pqs, t, pre) == codes).float().mean()
            assert same >= 0.999, (pre, float(same))
        if kv == "fp8":
            for p, k in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
                name = f"model.layers.{layer}.self_attn.{p}.{k}"
                assert t[name].dtype == F32 and t[name].shape == () and float(t[name]) > 0
                want.add(name)
    assert set(t) == want
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(t[name].float(), src[name])


@pytest.mark.parametrize("target, algo, kv", PAIRS)
def test_config_files(exported, quant_model, target, algo, kv):
    out = exported(target, algo, kv)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((quant_model / "config.json").read_text())
    assert config["architectures"] == source["architectures"] and config["torch_dtype"] == "float16"
    q = config["quantization_config"]
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (quant_model / f).is_file():
            assert (out / f).read_bytes() == (quant_model / f).read_bytes()
    if target == "hf-modelopt":
        nested = json.loads((out / "hf_quant_config.json").read_text())
        algo_name = {"fp8": "FP8", "w8a16": "W8A16", "w4a16_awq": "W4A16_AWQ", "nvfp4": "NVFP4"}[algo]
        qn = nested["quantization"]
        assert nested["producer"]["name"] == "modelopt" and qn["quant_algo"] == algo_name
        assert qn["kv_cache_quant_algo"] == ("FP8" if kv == "fp8" else None)
        assert qn["exclude_modules"] == ["lm_head", "model.embed_tokens"]
        assert qn.get("group_size") == {"w4a16_awq": G, "nvfp4": 16}.get(algo)
        if algo == "w4a16_awq":
            assert qn["has_zero_point"] is False and qn["pre_quant_scale"] is True
        assert q["quant_method"] == "modelopt" and q["quant_algo"] == algo_name and "lm_head" in q["ignore"]
        assert ("config_groups" in q) == (algo in ("fp8", "nvfp4"))
        assert ("kv_cache_scheme" in q) == (kv == "fp8")
    else:
        assert not (out / "hf_quant_config.json").exists()
        fmt = {"nvfp4": "nvfp4-pack-quantized", "w8a8_sq_per_channel": "int-quantized",
               "w8a8_sq_per_channel_per_token": "int-quantized"}.get(algo, "pack-quantized")
        assert q["quant_method"] == "compressed-tensors" and q["format"] == fmt
        assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
        w = q["config_groups"]["group_0"]["weights"]
        assert w["num_bits"] == (8 if algo in ("w8a16",) or algo.startswith("w8a8") else 4)
        assert (q["kv_cache_scheme"] is not None) == (kv == "fp8")


def test_big_models_are_split_with_an_index(quant_model, calibration, tmp_path):
    stats, _ = calibration
    export_checkpoint(quant_model, stats, QuantSettings("fp8", "none", G), "hf-modelopt", "float16", tmp_path,
                      max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    tensors = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())


@pytest.mark.parametrize("target, algo, kv", [p for p in PAIRS if p[2] == "fp8"])
def test_fp8_kv_scales_are_post_rope_k_amax_and_v_amax_over_448(exported, calibration, target, algo, kv):
    """k_scale = amax(K after RoPE)/448 (the key states the cache holds), v_scale = amax(V)/448
    (docs/format/hf-quantized-checkpoint.md §3)."""
    stats, _ = calibration
    t = load_file(exported(target, algo, kv) / "model.safetensors")
    for layer in range(4):
        pre = f"model.layers.{layer}.self_attn."
        k_amax = float(stats.k_rope_absmax[layer])
        assert float(t[pre + "k_proj.k_scale"]) == pytest.approx(k_amax / 448, rel=1e-6)
        assert float(t[pre + "v_proj.v_scale"]) == pytest.approx(
            float(stats.linear(layer, "self_attn.v_proj").y_absmax.max()) / 448, rel=1e-6)
    # the pre-RoPE k_proj amax is not what is written (it differs on this model)
    assert any(float(t[f"model.layers.{i}.self_attn.k_proj.k_scale"]) * 448 != pytest.approx(
        float(stats.linear(i, "self_attn.k_proj").y_absmax.max()), rel=1e-6) for i in range(4))


@pytest.mark.parametrize("target, algo", [("hf-modelopt", "nvfp4"), ("hf-compressed-tensors", "w4a16"),
                                          ("hf-compressed-tensors", "w8a8_sq_per_channel")])
def test_row_chunking_and_dtype_cast_leave_the_bytes_unchanged(quant_model, calibration, tmp_path, monkeypatch,
                                                               target, algo):
    """Quantization and source copies run in row chunks (bounded memory): tiny chunks give the same files,
    and a dtype change casts the copied tensors (fp16 source → bf16 checkpoint)."""
    from recipe_runner.quant import chunks

    stats, _ = calibration
    settings = QuantSettings(algo, "none", G)
    (tmp_path / "a").mkdir()
    export_checkpoint(quant_model, stats, settings, target, "bfloat16", tmp_path / "a")
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1000)  # 7 rows of 128 inputs, 3 of 256
    monkeypatch.setattr(chunks, "CODE_ELEMENTS", 600)  # the pool's chunks: 4 rows of 128 inputs, 2 of 256
    (tmp_path / "b").mkdir()
    export_checkpoint(quant_model, stats, settings, target, "bfloat16", tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    t, src = load_file(tmp_path / "b" / "model.safetensors"), load_hf_tensors(quant_model)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert t[name].dtype == torch.bfloat16 and torch.equal(t[name], src[name].to(torch.bfloat16))
