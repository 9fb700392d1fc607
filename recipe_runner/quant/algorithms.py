"""Every quantization algorithm a recipe may name, and every KV cache option, as one table.

Each `Algorithm` states the facts the rest of the code branches on: its family (which math
quant/projection.py runs), the calibration it needs, the recipe fields it reads, its TensorRT-LLM
checkpoint form, its Hugging Face forms and their consumers. The entries cite where their facts come
from. Pure data: no torch, no I/O; the JSON Schema's enum of algos equals the table's keys (a test
checks it).

Sources cited below, by short form:
  hf-ckpt      docs/format/hf-quantized-checkpoint.md: §1 ModelOpt's formats as exported, §2 what the
               consumers load, §3 what a producer must write (the FP8 KV cache included)
  layouts      docs/format/verified-layouts.md: ModelOpt's TensorRT-LLM exports, read tensor by tensor
  trtllm-ckpt  docs/format/trtllm-checkpoint.md: §2.4 QuantAlgo names, §4.2 SmoothQuant plugin tensors,
               §4.3 KV
These are the notes the formats were worked out in, shipped in docs/format/ (nothing reads them at run
time). What the code relies on is stated where it is used (this table, the module docstrings that cite
them) and, per TensorRT-LLM release, in recipe_runner/data/trtllm/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# families: which math quant/projection.py runs
NONE, WEIGHT_ONLY, AWQ, SMOOTHQUANT, FP8, NVFP4 = "none", "weight_only", "awq", "smoothquant", "fp8", "nvfp4"
# calibration statistics families (the calibrate stage's key holds them): awq, smoothquant, amax, kv
AWQ_STATISTICS, SMOOTHQUANT_STATISTICS, AMAX_STATISTICS, KV_STATISTICS = "awq", "smoothquant", "amax", "kv"

# output targets (hfexport/targets.py) and the consumers that load the Hugging Face ones
TRTLLM_CHECKPOINT = "trtllm-checkpoint"
HF_MODELOPT = "hf-modelopt"
HF_COMPRESSED_TENSORS = "hf-compressed-tensors"
TRTLLM_PYTORCH = "TensorRT-LLM's PyTorch backend"
VLLM = "vLLM"


@dataclass(frozen=True)
class KvCache:
    name: str
    trtllm_kv_algo: str | None  # config.json quantization.kv_cache_quant_algo
    # hf_quant_config kv_cache_quant_algo; with it the HF formats write k_scale/v_scale and the FP8
    # kv_cache_scheme. None: no HF format carries this cache's scales
    hf_kv_algo: str | None = None
    # why trtllm-build refuses paged context FMHA with this cache ("": it does not), unless the
    # weights are of family `paged_context_fmha_weights` (builder.py checks)
    paged_context_fmha: str = ""
    paged_context_fmha_weights: str | None = None

    @property
    def quantized(self) -> bool:
        return self.trtllm_kv_algo is not None


KV_CACHES: dict[str, KvCache] = {
    "none": KvCache("none", None),
    # INT8 scales as TensorRT-LLM's LLaMA converter computes them (trtllm-ckpt §4.3, quant/kv.py)
    "int8": KvCache("int8", "INT8", paged_context_fmha="trtllm-build refuses paged context FMHA with an INT8 KV "
                                                       "cache; set it to false"),
    # FP8 scales as ModelOpt computes them; vLLM reads k_scale/v_scale (hf-ckpt §3)
    "fp8": KvCache("fp8", "FP8", "FP8",
                   paged_context_fmha="trtllm-build refuses paged context FMHA with an FP8 KV cache unless the "
                                      "weights are FP8 too; set it to false or use algo fp8",
                   paged_context_fmha_weights=FP8),
}


@dataclass(frozen=True)
class CtArgs:
    """One compressed-tensors QuantizationArgs (config.json config_groups.group_0.weights / input_activations)."""

    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "channel" | "group" | "tensor" | "token" | "tensor_group"
    group_size: int | None = None  # with strategy "group" and None: the recipe's group_size
    dynamic: bool | str = False


@dataclass(frozen=True)
class CompressedTensors:
    format: str  # "pack-quantized" | "int-quantized" | "nvfp4-pack-quantized"
    weights: CtArgs
    input_activations: CtArgs | None = None


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str
    source: str  # where these facts come from
    # the calibration statistics family it collects (None: it needs no activation statistics)
    statistics: str | None = None
    params: tuple[str, ...] = ()  # recipe quantization fields it reads besides algo, kv_cache, exclude_modules
    calibration_params: tuple[str, ...] = ()  # of those, the ones calibration reads too
    weight_bits: int | None = None  # width of the weight codes (int: pack-quantized packs 32/bits per int32)
    weight_type: str = "int"  # "int" or "float" (E4M3 / E2M1 codes)
    granularity: str | None = None  # of the weight scales: "channel" | "group" | "tensor" | "block"
    block_size: int | None = None  # inputs per scale block (granularity "block")
    activations: str | None = None  # activation quantization: "static" | "dynamic" | None (weight-only)
    kv_caches: tuple[str, ...] = tuple(KV_CACHES)  # the KV caches it may pair with
    kv_cache_refusal: str = ""  # why the others are refused
    trtllm_quant_algo: str | None = None  # config.json quantization.quant_algo (QuantAlgo's member name)
    trtllm_checkpoint: bool = True  # written as the TensorRT-LLM checkpoint (quantize + shard stages)
    sq_plugin: bool = False  # SmoothQuant in TensorRT-LLM's plugin form (smoothing folded into the norms)
    trtllm_tensors: tuple[str, ...] = ()  # the tensors it adds to a decoder layer of the rank files (last name part)
    modelopt_algo: str | None = None  # hf_quant_config.json quant_algo (and config.json quantization_config)
    compressed_tensors: CompressedTensors | None = None
    # HF target -> the consumers that load it; a target missing here is refused with hf_refusals' reason
    hf_loaders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hf_refusals: Mapping[str, str] = field(default_factory=dict)
    # HF target -> the tensors of one quantized projection: (suffix, "field[:transform]") in the written
    # order, field a QuantizedProjection field (quant/projection.py), transform one of hfexport/export.py
    hf_tensors: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    @property
    def quantizes_weights(self) -> bool:
        return self.family != NONE

    @property
    def calibrated(self) -> bool:
        return self.statistics is not None

    @property
    def smooths(self) -> bool:
        """Whether a per-input-channel scale s moves between the weights and their input (AWQ, SmoothQuant)."""
        return self.family in (AWQ, SMOOTHQUANT)

    @property
    def grouped(self) -> bool:
        return self.granularity == "group"


# ---- the Hugging Face tensor sets (hf-ckpt §1.3, §1.4, §2.3) -------------------------------------

MODELOPT_FP8 = (("weight", "codes"), ("weight_scale", "weight_scale"), ("input_scale", "input_scale"))
MODELOPT_NVFP4 = (("weight_scale", "weight_scale"), ("weight", "codes:e2m1"), ("weight_scale_2", "weight_scale_2"),
                  ("input_scale", "input_scale"))
MODELOPT_INT8 = (("weight", "codes"), ("weight_scale", "weight_scale"))
# packed along the output rows like ModelOpt's TensorRT-LLM export; pre_quant_scale where no norm absorbs 1/s
MODELOPT_AWQ = (("weight", "codes:int4_rows"), ("weight_scale", "weight_scale"), ("pre_quant_scale", "prequant"))
CT_PACK_QUANTIZED = (("weight_packed", "codes:int32"), ("weight_scale", "weight_scale:column"),
                     ("weight_shape", "codes:shape"))
CT_INT_QUANTIZED = (("weight", "codes"), ("weight_scale", "weight_scale:column"), ("input_scale", "input_scale:vector"))
CT_NVFP4 = (("weight_scale", "weight_scale"), ("weight_packed", "codes:e2m1"),
            ("weight_global_scale", "weight_scale_2:reciprocal"), ("input_global_scale", "input_scale:reciprocal"))

_SQ_MODELOPT_REFUSAL = (
    f"{TRTLLM_PYTORCH} rejects SmoothQuant (W8A8_SQ_* matches none of its linear methods: 'unsupported "
    "quant mode') and vLLM's modelopt loader accepts only FP8/NVFP4 quant_algo; use target "
    "hf-compressed-tensors (vLLM int8 W8A8), or algo fp8 / w8a16 / w4a16_awq for TensorRT-LLM")
_SQ_TRTLLM = "TensorRT-LLM's plugin forms (SmoothQuantAttention/GatedMLP/RmsNorm), trtllm-ckpt §4.2; quant/smoothquant.py"
_SQ_CT_WEIGHTS = CtArgs(8, "int", "channel")
# what the three SmoothQuant forms share: int8 weights smoothed with s_j = a_j^α / w_j^(1-α)
_SMOOTHQUANT = {"statistics": SMOOTHQUANT_STATISTICS, "params": ("smoothquant_alpha",), "weight_bits": 8}

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm(
        "none", NONE, "the model dtype; with kv_cache fp8, hf-modelopt writes ModelOpt's KV-only checkpoint",
        hf_loaders={HF_MODELOPT: (TRTLLM_PYTORCH,)},
        hf_refusals={HF_COMPRESSED_TENSORS: "this release writes no compressed-tensors checkpoint without quantized "
                                            "weights; choose a quantization.algo, or target hf-modelopt for a KV-only "
                                            "checkpoint (TensorRT-LLM's PyTorch backend)"}),
    Algorithm(
        "w8a16", WEIGHT_ONLY, "TensorRT-LLM's build-time weight-only quantizer (quant/weight_only.py): the "
                              "checkpoint keeps the model-dtype weights; ModelOpt W8A16 (hf-ckpt §1.3); "
                              "compressed-tensors pack-quantized (hf-ckpt §2.3)",
        weight_bits=8, granularity="channel", trtllm_quant_algo="W8A16", modelopt_algo="W8A16",
        compressed_tensors=CompressedTensors("pack-quantized", CtArgs(8, "int", "channel")),
        hf_loaders={HF_MODELOPT: (TRTLLM_PYTORCH,), HF_COMPRESSED_TENSORS: (VLLM,)},
        hf_tensors={HF_MODELOPT: MODELOPT_INT8, HF_COMPRESSED_TENSORS: CT_PACK_QUANTIZED}),
    Algorithm(
        "w4a16", WEIGHT_ONLY, "as w8a16 with int4 codes",
        weight_bits=4, granularity="channel", trtllm_quant_algo="W4A16",
        compressed_tensors=CompressedTensors("pack-quantized", CtArgs(4, "int", "channel")),
        hf_loaders={HF_COMPRESSED_TENSORS: (VLLM,)},
        hf_refusals={HF_MODELOPT: "ModelOpt writes no per-channel INT4 checkpoint; use w4a16_awq (TensorRT-LLM) or "
                                  "target hf-compressed-tensors (vLLM)"},
        hf_tensors={HF_COMPRESSED_TENSORS: CT_PACK_QUANTIZED}),
    Algorithm(
        "w4a16_awq", AWQ, "AWQ (Lin et al. 2023, quant/awq.py); ModelOpt's W4A16_AWQ export (layouts); "
                          "compressed-tensors pack-quantized group scales (hf-ckpt §2.3)",
        statistics=AWQ_STATISTICS, params=("group_size",),
        calibration_params=("group_size",),  # the scale search quantizes with the group size
        weight_bits=4, granularity="group", trtllm_quant_algo="W4A16_AWQ",
        trtllm_tensors=("weight", "weights_scaling_factor", "prequant_scaling_factor"), modelopt_algo="W4A16_AWQ",
        compressed_tensors=CompressedTensors("pack-quantized", CtArgs(4, "int", "group")),
        hf_loaders={HF_MODELOPT: (TRTLLM_PYTORCH,), HF_COMPRESSED_TENSORS: (VLLM,)},
        hf_tensors={HF_MODELOPT: MODELOPT_AWQ, HF_COMPRESSED_TENSORS: CT_PACK_QUANTIZED}),
    Algorithm(
        "w8a8_sq_per_channel", SMOOTHQUANT, "ModelOpt's out-of-the-box form (Int8SmoothQuantLinear), layouts; "
                                            "vLLM's compressed-tensors W8A8 static (hf-ckpt §2.3)",
        **_SMOOTHQUANT, granularity="channel", activations="static", trtllm_quant_algo="W8A8_SQ_PER_CHANNEL",
        trtllm_tensors=("weight", "weights_scaling_factor", "activation_scaling_factor", "prequant_scaling_factor"),
        compressed_tensors=CompressedTensors("int-quantized", _SQ_CT_WEIGHTS, CtArgs(8, "int", "tensor")),
        hf_loaders={HF_COMPRESSED_TENSORS: (VLLM,)}, hf_refusals={HF_MODELOPT: _SQ_MODELOPT_REFUSAL},
        hf_tensors={HF_COMPRESSED_TENSORS: CT_INT_QUANTIZED}),
    Algorithm(
        "w8a8_sq_per_channel_per_token", SMOOTHQUANT, _SQ_TRTLLM + "; vLLM's compressed-tensors W8A8 dynamic",
        **_SMOOTHQUANT, granularity="channel", activations="dynamic",
        trtllm_quant_algo="W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", sq_plugin=True,
        trtllm_tensors=("weight", "per_channel_scale", "smoother", "scale_to_int"),
        compressed_tensors=CompressedTensors("int-quantized", _SQ_CT_WEIGHTS,
                                             CtArgs(8, "int", "token", dynamic=True)),
        hf_loaders={HF_COMPRESSED_TENSORS: (VLLM,)}, hf_refusals={HF_MODELOPT: _SQ_MODELOPT_REFUSAL},
        hf_tensors={HF_COMPRESSED_TENSORS: CT_INT_QUANTIZED}),
    Algorithm(
        "w8a8_sq_per_tensor", SMOOTHQUANT, _SQ_TRTLLM,
        **_SMOOTHQUANT, granularity="tensor", activations="static", trtllm_quant_algo="W8A8_SQ_PER_TENSOR_PLUGIN",
        sq_plugin=True,
        trtllm_tensors=("weight", "per_channel_scale", "act_scale", "smoother", "scale_to_int",
                        "quantization_scaling_factor"),
        hf_refusals={HF_MODELOPT: _SQ_MODELOPT_REFUSAL,
                     HF_COMPRESSED_TENSORS: "vLLM's compressed-tensors W8A8 takes per-channel weight scales; use "
                                            "w8a8_sq_per_channel (static) or w8a8_sq_per_channel_per_token "
                                            "(dynamic)"}),
    Algorithm(
        "fp8", FP8, "TensorRT-LLM's FP8Linear (quant/fp8.py); ModelOpt FP8 (hf-ckpt §1.3)",
        statistics=AMAX_STATISTICS, weight_bits=8, weight_type="float", granularity="tensor", activations="static",
        # FP8 weights with an INT8 KV cache: no TensorRT-LLM tool (ModelOpt's FP8 recipes, convert_checkpoint.py)
        # produces it, and whether trtllm-build's strongly typed FP8 network accepts an INT8 KV cache is
        # unverified; we refuse it rather than write a checkpoint that might not load. Add "int8" once verified
        # on a GPU.
        kv_caches=("none", "fp8"), kv_cache_refusal="FP8 checkpoints pair with an FP8 KV cache (TensorRT-LLM's FP8 "
                                                    "workflow); use kv_cache: fp8 or none",
        trtllm_quant_algo="FP8", trtllm_tensors=("weight", "weights_scaling_factor", "activation_scaling_factor"),
        modelopt_algo="FP8",
        hf_loaders={HF_MODELOPT: (TRTLLM_PYTORCH, VLLM)},
        hf_refusals={HF_COMPRESSED_TENSORS: "this release writes FP8 only as hf-modelopt, which both TensorRT-LLM's "
                                            "PyTorch backend and vLLM load; use output.targets: [hf-modelopt]"},
        hf_tensors={HF_MODELOPT: MODELOPT_FP8}),
    Algorithm(
        "nvfp4", NVFP4, "ModelOpt's NVFP4QTensor (hf-ckpt §1.4, quant/nvfp4.py); trtllm-build's checkpoint path is "
                        "not implemented for it",
        statistics=AMAX_STATISTICS, weight_bits=4, weight_type="float", granularity="block", block_size=16,
        activations="static",  # a calibrated global input scale; the consumer computes the block scales
        trtllm_checkpoint=False, modelopt_algo="NVFP4",
        compressed_tensors=CompressedTensors("nvfp4-pack-quantized", CtArgs(4, "float", "tensor_group", 16),
                                             CtArgs(4, "float", "tensor_group", 16, "local")),
        hf_loaders={HF_MODELOPT: (TRTLLM_PYTORCH, VLLM), HF_COMPRESSED_TENSORS: (VLLM, TRTLLM_PYTORCH)},
        hf_tensors={HF_MODELOPT: MODELOPT_NVFP4, HF_COMPRESSED_TENSORS: CT_NVFP4}),
)}


def quantizes(algo: str, kv_cache: str) -> bool:
    """Whether anything is quantized: the weights or the KV cache."""
    return ALGORITHMS[algo].quantizes_weights or KV_CACHES[kv_cache].quantized


def needs_calibration(algo: str, kv_cache: str) -> bool:
    """Whether the algo or the KV cache needs activation statistics (a calibrate stage)."""
    return ALGORITHMS[algo].calibrated or KV_CACHES[kv_cache].quantized


def statistics_families(algo: str, kv_cache: str) -> list[str]:
    """The statistics the calibrate stage collects for them (its key holds this list)."""
    families = [ALGORITHMS[algo].statistics] if ALGORITHMS[algo].calibrated else []
    return families + ([KV_STATISTICS] if KV_CACHES[kv_cache].quantized else [])
