"""Rotary position embedding as TensorRT-LLM applies it to LLaMA (`rope_gpt_neox`: rotate halves),
from the checkpoint's `rotary_base` and `rotary_scaling` only.

Scaling types (RotaryScalingType, read as rotary_scaling["type"] or ["rope_type"]):
  linear   positions are divided by `factor`
  dynamic  NTK: the base grows with the sequence length once it exceeds max_position_embeddings
  llama3   low frequencies divided by `factor`, high ones kept, a smooth ramp in between
  yarn     NTK-by-parts interpolation plus an attention temperature (mscale) on cos/sin
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recipe_runner.errors import UserError

SUPPORTED_SCALING = ("linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class Rope:
    head_size: int
    base: float
    scaling: dict[str, Any] | None
    max_position_embeddings: int

    @property
    def scaling_type(self) -> str | None:
        if not self.scaling:
            return None
        kind = self.scaling.get("type", self.scaling.get("rope_type"))
        return None if kind == "default" else kind

    def check(self) -> None:
        kind = self.scaling_type
        if kind is not None and kind not in SUPPORTED_SCALING:
            raise UserError(f"rotary_scaling type '{kind}' is not supported (supported: "
                            f"{', '.join(SUPPORTED_SCALING)})")

    def tables(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [seq_len, head_size] for positions 0..seq_len-1 (float32)."""
        inv_freq, mscale = self._inv_freq(seq_len)
        positions = torch.arange(seq_len, dtype=torch.float32)
        if self.scaling_type == "linear":
            positions = positions / float(self.scaling["factor"])
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * mscale, angles.sin() * mscale

    def _inv_freq(self, seq_len: int) -> tuple[torch.Tensor, float]:
        d, kind = self.head_size, self.scaling_type
        base = self.base
        if kind == "dynamic" and seq_len > self.max_position_embeddings:
            factor = float(self.scaling["factor"])
            base = base * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (d / (d - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        if kind == "llama3":
            return _llama3(inv_freq, self.scaling), 1.0
        if kind == "yarn":
            return _yarn(d, base, self.scaling)
        return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(medium, blended, scaled)


def _yarn(d: int, base: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    original = float(s.get("original_max_position_embeddings", 4096))
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("attention_factor") is not None:
        mscale = float(s["attention_factor"])
    elif s.get("mscale") and s.get("mscale_all_dim"):
        mscale = mscale_of(factor, float(s["mscale"])) / mscale_of(factor, float(s["mscale_all_dim"]))
    else:
        mscale = mscale_of(factor)

    def correction_dim(rotations: float) -> float:
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, seq, head_size]; GPT-NeoX style (the two halves of each head rotate together)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
