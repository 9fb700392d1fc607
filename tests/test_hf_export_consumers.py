"""Our Hugging Face exports read by code we did not write: the vLLM project's compressed-tensors library
(what vLLM's compressed-tensors loader and llm-compressor are built on).

* transformers loads every hf-compressed-tensors export through compressed-tensors (its config parsed by
  compressed-tensors' own QuantizationConfig, its tensors decompressed by its compressors), and the dense
  weights it gets are the ones our CPU reference dequantizes, within bf16 rounding.
* compressed-tensors' ModelOpt NVFP4 converter turns our hf-modelopt NVFP4 export into the tensors of our
  hf-compressed-tensors NVFP4 export, bit for bit.

Neither TensorRT-LLM nor vLLM can run here (no GPU); this is the closest independent reader available.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.reference.hf_quantized import HFQuantizedModel
from tests.test_hf_export_exclusion import EXCLUDE
from tests.test_hf_export_formats import OUT

# transformers warns that the checkpoint's own quantization_config wins over the one passed (it keeps `dequantize`)
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
ACTIVATION_AND_KV_SCALES = ("input_scale", "input_global_scale", "k_scale", "v_scale")
CT_EXPORTS = [("w8a16", "none", ("lm_head",)), ("w4a16", "none", ("lm_head",)), ("w4a16_awq", "fp8", ("lm_head",)),
              ("nvfp4", "fp8", ("lm_head",)), ("w8a8_sq_per_channel", "none", ("lm_head",)),
              ("w8a8_sq_per_channel_per_token", "fp8", ("lm_head",)), ("w4a16_awq", "none", EXCLUDE),
              ("nvfp4", "none", EXCLUDE)]


def _dequantizing_config():
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if "dequantize" in inspect.signature(CompressedTensorsConfig).parameters:
        return CompressedTensorsConfig(dequantize=True)
    return CompressedTensorsConfig(run_compressed=False)  # transformers before `dequantize`


def _within_bf16_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    # compressed-tensors decompresses in a 16-bit dtype: allow a bf16 half-ulp (2^-9) per element, and margin
    return bool(((got - want).abs() <= want.abs() * 2 ** -8 + 1e-7).all())


@pytest.mark.parametrize("algo, kv, exclude", CT_EXPORTS, ids=lambda v: "excl" if v == EXCLUDE else str(v))
def test_transformers_with_compressed_tensors_decompresses_our_weights(hf_exported, algo, kv, exclude):
    from transformers import AutoModelForCausalLM

    out = hf_exported("hf-compressed-tensors", algo, kv, exclude)
    model, info = AutoModelForCausalLM.from_pretrained(out, quantization_config=_dequantizing_config(),
                                                       dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    # the dense model has no use for activation and KV-cache scales; nothing else may be left over
    assert all(k.endswith(ACTIVATION_AND_KV_SCALES) for k in info["unexpected_keys"]), info["unexpected_keys"]
    dense = model.state_dict()
    reference = HFQuantizedModel(out)
    for index in range(4):
        layer = reference.layer(index)
        for proj in OUT:
            got, want = dense[f"model.layers.{index}.{proj}.weight"].float(), layer.linears[proj].weight
            assert got.shape == want.shape and _within_bf16_rounding(got, want), (index, proj)


def test_compressed_tensors_converts_our_modelopt_nvfp4_into_our_compressed_tensors_nvfp4(hf_exported, tmp_path):
    from compressed_tensors.entrypoints.convert import ModelOptNvfp4Converter, convert_checkpoint
    from compressed_tensors.quantization import QuantizationArgs

    modelopt = hf_exported("hf-modelopt", "nvfp4", "fp8")
    exclude = json.loads((modelopt / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    converter = ModelOptNvfp4Converter(ignore=exclude, targets=["Linear"],
                                       kv_cache_scheme=QuantizationArgs(num_bits=8, type="float", dynamic=False))
    convert_checkpoint(modelopt, tmp_path / "converted", converter, device="cpu", max_workers=1)
    converted = load_file(tmp_path / "converted" / "model.safetensors")
    ours = load_file(hf_exported("hf-compressed-tensors", "nvfp4", "fp8") / "model.safetensors")
    assert set(converted) == set(ours)
    for name, theirs in converted.items():
        mine = ours[name].reshape(theirs.shape)  # global scales: 0-dim there, [1] here (both load)
        if theirs.dtype in (torch.uint8, torch.float8_e4m3fn):  # packed E2M1 codes and block scales
            assert mine.dtype == theirs.dtype and torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), name
        elif name.endswith(("k_scale", "v_scale")):  # the converter stores them in bf16
            assert _within_bf16_rounding(theirs.float(), mine.float()), name
        else:
            assert torch.allclose(theirs.float(), mine.float(), rtol=1e-6, atol=0), name
