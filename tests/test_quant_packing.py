"""int4 packing: two signed nibbles per byte along the output rows."""
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
