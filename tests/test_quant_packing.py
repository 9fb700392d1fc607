"""Packing: int4 codes two per byte along the output rows, and E2M1 (NVFP4) code rounding."""
from __future__ import annotations

import pytest
import torch

from recipe_runner.quant.packing import pack_int4_rows, unpack_int4_rows


def test_pack_round_trips_every_code():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (64, 40), generator=gen, dtype=torch.int8)
    packed = pack_int4_rows(codes)
    assert packed.dtype == torch.int8 and packed.shape == (32, 40)
    assert torch.equal(unpack_int4_rows(packed), codes)


def test_row_2k_is_the_low_nibble_and_2k_plus_1_the_high_nibble():
    codes = torch.tensor([[1, -8], [-1, 7]], dtype=torch.int8)  # rows 0 and 1
    packed = pack_int4_rows(codes).view(torch.uint8)
    assert packed.tolist() == [[0xF1, 0x78]]  # col 0: low 0x1, high 0xF (-1); col 1: low 0x8 (-8), high 0x7


@pytest.mark.parametrize("codes, message", [
    (torch.zeros((3, 2), dtype=torch.int8), "row count must be even"),
    (torch.full((2, 2), 8, dtype=torch.int8), r"\[-8, 7\]"),
])
def test_pack_refuses_what_it_cannot_represent(codes, message):
    with pytest.raises(ValueError, match=message):
        pack_int4_rows(codes)


def test_e2m1_codes_pick_the_nearest_value_and_the_even_code_on_ties():
    from recipe_runner.quant import nvfp4

    values = nvfp4.E2M1_VALUES
    # every midpoint (the ties), every value, and a fine grid, both signs, past saturation
    grid = torch.cat([(values[1:] + values[:-1]) / 2, values, torch.arange(0, 7.01, 0.01, dtype=torch.float32)])
    for x in (grid, -grid):
        dist = (x.abs().clamp(max=6)[:, None] - values[None, :]).abs()
        nearest = dist == dist.min(dim=1, keepdim=True).values
        # among equally near values the even index wins (there are at most two)
        want = torch.where(nearest[:, 0::2].any(dim=1), (nearest * (torch.arange(8) % 2 == 0)).int().argmax(dim=1),
                           nearest.int().argmax(dim=1))
        want = want.to(torch.uint8) | (((x < 0) & (want > 0)).to(torch.uint8) << 3)
        assert torch.equal(nvfp4.e2m1_codes(x), want)
    assert nvfp4.e2m1_values(nvfp4.e2m1_codes(torch.tensor([1.25, 2.5, 3.5, 5.0, -0.25]))).tolist() == \
        [1.0, 2.0, 4.0, 4.0, 0.0]
