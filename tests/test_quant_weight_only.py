"""Weight-only INT8/INT4: symmetric per-output-channel scales; rounding within half a step."""
from __future__ import annotations

import pytest
import torch

from recipe_runner.quant import weight_only


def _weight(rows=48, cols=64, seed=0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[3] *= 40.0  # one loud channel must not hurt the others (per-channel scales)
    w[5] = 0.0  # an all-zero channel
    return w


@pytest.mark.parametrize("bits, qmax", [(8, 127), (4, 7)])
def test_dequantized_weights_are_within_half_a_step(bits, qmax):
    w = _weight()
    fmt = weight_only.FORMATS[bits]
    scales = weight_only.per_channel_scales(w, fmt)
    assert torch.allclose(scales[w.abs().amax(1) > 0], (w.abs().amax(1) / qmax)[w.abs().amax(1) > 0])
    codes = weight_only.quantize_per_channel(w, scales, fmt)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -qmax - 1 and int(codes.max()) <= qmax
    error = (weight_only.dequantize_per_channel(codes, scales) - w).abs()
    assert torch.all(error <= scales[:, None] / 2 * (1 + 1e-6))
    assert torch.equal(weight_only.fake_quantize(w, bits)[5], torch.zeros(64))


def test_int4_is_coarser_than_int8():
    w = _weight(seed=1)
    err8 = (weight_only.fake_quantize(w, 8) - w).abs().mean()
    err4 = (weight_only.fake_quantize(w, 4) - w).abs().mean()
    assert err4 > 10 * err8
