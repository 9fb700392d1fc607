"""Quantized TensorRT-LLM checkpoints for the verify tests, built from an unquantized one with the
formulas of docs/format/trtllm-checkpoint.md §4 and docs/format/verified-layouts.md (independent of
the quantize stage).

Calibration runs the HF model in float32 on fixed random token sequences and records, per
linear, the per-input-channel max |x| and the max |y|.
"""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import load_hf_tensors, load_ranks

CALIBRATION = [torch.randint(0, 1001, (24,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(4)]

# TRT module -> (HF module whose input it sees, HF modules whose outputs it produces, row-parallel)
MODULES = {
    "attention.qkv": ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), False),
    "attention.dense": ("self_attn.o_proj", ("self_attn.o_proj",), True),
    "mlp.fc": ("mlp.gate_proj", ("mlp.gate_proj",), False),
    "mlp.gate": ("mlp.up_proj", ("mlp.up_proj",), False),
    "mlp.proj": ("mlp.down_proj", ("mlp.down_proj",), True),
}
# Modules sharing one SmoothQuant smoother with the norm it is folded into (plugin form).
SQ_FOLDED = {"input_layernorm": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("attention.qkv",)),
             "post_layernorm": (("mlp.gate_proj", "mlp.up_proj"), ("mlp.fc", "mlp.gate"))}
PLUGIN_ALGOS = {"sq_per_token": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "sq_per_tensor": "W8A8_SQ_PER_TENSOR_PLUGIN"}


@dataclass
class Stats:
    x_amax: torch.Tensor  # [in]
    y_amax: torch.Tensor  # scalar


@functools.lru_cache(maxsize=4)  # one calibration per model serves every format built from it
def calibrate(model_dir: Path) -> dict[str, Stats]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stats: dict[str, Stats] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            y = output.detach().abs().amax()
            old = stats.get(name)
            stats[name] = Stats(x if old is None else torch.maximum(old.x_amax, x),
                                y if old is None else torch.maximum(old.y_amax, y))
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_hook(hook(name.removeprefix("model.")))
    with torch.no_grad():
        for seq in CALIBRATION:
            model(torch.tensor([seq]))
    return stats


class Quantizer:
    """Quantizes one rank's tensors of one layer, module by module."""

    def __init__(self, algo: str, stats: dict[str, Stats], hf: dict[str, torch.Tensor], tp: int, group: int,
                 alpha: float = 0.5):
        self.algo, self.stats, self.hf, self.tp, self.group, self.alpha = algo, stats, hf, tp, group, alpha

    def x_amax(self, layer: int, module: str, tp_rank: int) -> torch.Tensor:
        src, _, row = MODULES[module]
        x = self.stats[f"layers.{layer}.{src}"].x_amax
        return x.chunk(self.tp)[tp_rank] if row else x

    def y_amax(self, layer: int, module: str) -> torch.Tensor:
        return max(self.stats[f"layers.{layer}.{n}"].y_amax for n in MODULES[module][1])

    def smoother(self, layer: int, hf_modules: tuple[str, ...]) -> torch.Tensor:
        """s_j = max|x_j|^α / max|W_:,j|^(1-α) over every full HF weight that reads input j."""
        x = self.stats[f"layers.{layer}.{hf_modules[0]}"].x_amax
        w = torch.stack([self.hf[f"model.layers.{layer}.{m}.weight"].abs().amax(0) for m in hf_modules]).amax(0)
        return (x.pow(self.alpha) / w.clamp(min=1e-8).pow(1 - self.alpha)).clamp(min=1e-5)

    def layer(self, t: dict[str, torch.Tensor], prefix: str, layer: int, tp_rank: int) -> None:
        smoothers = {}
        if self.algo in PLUGIN_ALGOS:
            for norm, (hf_modules, modules) in SQ_FOLDED.items():
                s = self.smoother(layer, hf_modules)
                t[f"{prefix}{norm}.weight"] = (t[f"{prefix}{norm}.weight"].float() / s).half()
                smoothers.update({m: s for m in modules})
            for module, hf_module in (("attention.dense", "self_attn.o_proj"), ("mlp.proj", "mlp.down_proj")):
                s = self.smoother(layer, (hf_module,)).chunk(self.tp)[tp_rank]
                t[f"{prefix}{module}.smoother"] = s.reshape(1, -1).float()
                smoothers[module] = s
        for module in MODULES:
            getattr(self, self.algo)(t, prefix + module, layer, module, tp_rank, smoothers.get(module))

    # -- formats (each replaces <name>.weight and adds its scales) ---------------------------

    def w8a16_int8(self, t, name, layer, module, tp_rank, _):
        w = t[f"{name}.weight"].float()
        scale = w.abs().amax(1) / 127
        t[f"{name}.weight"] = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        t[f"{name}.weights_scaling_factor"] = scale

    def awq(self, t, name, layer, module, tp_rank, _):
        x = self.x_amax(layer, module, tp_rank)
        s = x.pow(0.5) / (x.pow(0.5).max() * x.pow(0.5).min()).sqrt()  # salient inputs get larger weights
        w = t[f"{name}.weight"].float() * s  # W·diag(s), and the engine multiplies x by 1/s
        groups = w.reshape(w.shape[0], -1, self.group)
        scale = groups.abs().amax(-1) / 7
        q = torch.round(groups / scale[..., None]).clamp(-8, 7).reshape(w.shape).to(torch.int16)
        t[f"{name}.weight"] = (((q[1::2] & 0x0F) << 4) | (q[0::2] & 0x0F)).to(torch.uint8).view(torch.int8)
        t[f"{name}.weights_scaling_factor"] = scale
        t[f"{name}.prequant_scaling_factor"] = (1 / s).half()

    def fp8(self, t, name, layer, module, tp_rank, _):
        w = t[f"{name}.weight"].float()
        w_scale = w.abs().amax() / 448
        t[f"{name}.weight"] = (w / w_scale).to(torch.float8_e4m3fn)
        t[f"{name}.weights_scaling_factor"] = w_scale.reshape(1)
        t[f"{name}.activation_scaling_factor"] = (self.x_amax(layer, module, tp_rank).max() / 448).reshape(1)

    def sq_modelopt(self, t, name, layer, module, tp_rank, _):
        x = self.x_amax(layer, module, tp_rank)
        w = t[f"{name}.weight"].float()
        s = (x.pow(self.alpha) / w.abs().amax(0).clamp(min=1e-8).pow(1 - self.alpha)).clamp(min=1e-5)
        w = w * s  # W ≈ q·scale[out]·(1/s)[in]
        scale = w.abs().amax(1) / 127
        t[f"{name}.weight"] = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        t[f"{name}.weights_scaling_factor"] = scale
        t[f"{name}.activation_scaling_factor"] = ((x / s).max() / 127).reshape(1)
        t[f"{name}.prequant_scaling_factor"] = (1 / s).half()

    def sq_per_token(self, t, name, layer, module, tp_rank, s):
        w = t[f"{name}.weight"].float() * s  # smoothed: the input is divided by s
        s_w = 127 / w.abs().amax(1).clamp(min=1e-8)
        t[f"{name}.weight"] = torch.round(w * s_w[:, None]).clamp(-128, 127).to(torch.int8)
        t[f"{name}.per_channel_scale"] = (1 / s_w).reshape(1, -1)
        self._scale_to_int(t, name, module, torch.tensor(1.0))

    def sq_per_tensor(self, t, name, layer, module, tp_rank, s):
        w = t[f"{name}.weight"].float() * s
        per_channel = module == "attention.qkv"  # SmoothQuantAttention forces per-channel qkv
        w_amax = w.abs().amax(1) if per_channel else w.abs().amax().reshape(1)
        s_w = 127 / w_amax.clamp(min=1e-8)
        s_x = 127 / (self.x_amax(layer, module, tp_rank) / s).max()
        y = self.y_amax(layer, module)
        t[f"{name}.weight"] = torch.round(w * s_w[:, None]).clamp(-128, 127).to(torch.int8)
        t[f"{name}.per_channel_scale"] = ((127 / y) / (s_x * s_w)).reshape(1, -1)
        t[f"{name}.act_scale"] = (y / 127).reshape(1, 1)
        self._scale_to_int(t, name, module, s_x)

    def _scale_to_int(self, t, name, module, s_x):
        prefix = name[: -len(module)]
        where = {"attention.qkv": "input_layernorm.scale_to_int", "mlp.fc": "post_layernorm.scale_to_int",
                 "attention.dense": "attention.quantization_scaling_factor",
                 "mlp.proj": "mlp.quantization_scaling_factor"}.get(module)
        if where and not (where.endswith("quantization_scaling_factor") and self.algo == "sq_per_token"):
            t[prefix + where] = s_x.reshape(1).float()


ALGOS = {"w8a16_int8": "W8A16", "awq": "W4A16_AWQ", "fp8": "FP8", "sq_modelopt": "W8A8_SQ_PER_CHANNEL",
         **PLUGIN_ALGOS}


def quantize_checkpoint(ckpt: Path, out: Path, model_dir: Path, algo: str | None, *, kv: str | None = None,
                        group_size: int = 16) -> Path:
    """A copy of the unquantized checkpoint `ckpt` in `algo` (a key of ALGOS, or None) with an
    optional quantized KV cache ("INT8"/"FP8")."""
    config, ranks = load_ranks(ckpt)
    stats = calibrate(model_dir)
    hf = {n: t.float() for n, t in load_hf_tensors(model_dir).items()}
    tp, pp, L = config["mapping"]["tp_size"], config["mapping"]["pp_size"], config["num_hidden_layers"]
    quantizer = Quantizer(algo, stats, hf, tp, group_size) if algo else None
    out.mkdir(parents=True)
    for r, tensors in enumerate(ranks):
        layers = torch.tensor_split(torch.arange(L), pp)[r // tp].tolist()
        for local, layer in enumerate(layers):
            prefix = f"transformer.layers.{local}."
            if quantizer is not None:
                quantizer.layer(tensors, prefix, layer, r % tp)
            if kv is not None:
                amax = max(stats[f"layers.{layer}.self_attn.{p}_proj"].y_amax for p in "qkv")
                tensors[prefix + "attention.kv_cache_scaling_factor"] = (amax / (127 if kv == "INT8" else 448)).reshape(1)
        save_file({n: v.contiguous() for n, v in tensors.items()}, out / f"rank{r}.safetensors")
    config["quantization"].update(quant_algo=ALGOS[algo] if algo else None, kv_cache_quant_algo=kv,
                                  group_size=group_size)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def with_quant_algo(ckpt: Path, out: Path, quant_algo: str) -> Path:
    """The same tensors with another config quant_algo (W8A16/W4A16: trtllm-build quantizes)."""
    shutil.copytree(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["quant_algo"] = quant_algo
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
