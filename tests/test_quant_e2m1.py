"""NVFP4's E2M1 codes by table lookup (quant/nvfp4.py e2m1_codes) against the rounding's definition
(_e2m1_rounding): equal on every value tried, ties and their float32 neighbours first."""
from __future__ import annotations

import torch

from recipe_runner.quant import nvfp4

TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
EDGES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # the values, where the where-chain switches ranges (2, 4) and saturation starts (6)


def _neighbours(values: list[float], steps: int = 3) -> torch.Tensor:
    """Each value and its `steps` float32 neighbours on both sides (nextafter), both signs."""
    x = torch.tensor(values, dtype=torch.float32)
    out = [x]
    up, down = x.clone(), x.clone()
    for _ in range(steps):
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(float("-inf")))
        out += [up, down]
    both = torch.cat(out)
    return torch.cat([both, -both])


def _same(x: torch.Tensor) -> None:
    got, want = nvfp4.e2m1_codes(x), nvfp4._e2m1_rounding(x)
    bad = (got != want).nonzero().reshape(-1)[:5]
    assert torch.equal(got, want), [(float(x[i]), int(got[i]), int(want[i])) for i in bad]


def test_ties_round_to_the_even_code_and_their_neighbours_to_the_nearest_value():
    _same(_neighbours(TIES + EDGES))
    codes = nvfp4.e2m1_codes(torch.tensor(TIES))
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6]  # the even code of the two nearest
    above = nvfp4.e2m1_codes(torch.nextafter(torch.tensor(TIES), torch.tensor(7.0)))
    below = nvfp4.e2m1_codes(torch.nextafter(torch.tensor(TIES), torch.tensor(0.0)))
    assert above.tolist() == [1, 2, 3, 4, 5, 6, 7] and below.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_zero_tiny_subnormal_saturated_infinite_and_nan_values():
    tiny = torch.finfo(torch.float32).tiny
    special = [0.0, tiny, tiny / 2, 1e-45, 1e-30, 0.1, 6.0, 6.5, 7.0, 1e30, torch.finfo(torch.float32).max,
               float("inf")]
    x = torch.tensor(special + [-v for v in special])
    _same(x)
    assert nvfp4.e2m1_codes(torch.tensor([-0.0, -1e-45, -0.25, -0.26])).tolist() == [0, 0, 0, 9]  # no sign on 0
    assert nvfp4.e2m1_codes(torch.tensor([6.0, 1e30, float("inf"), -6.5, float("-inf")])).tolist() == [7, 7, 7, 15, 15]
    nan = torch.tensor([float("nan"), -float("nan")])
    assert nvfp4.e2m1_codes(nan).tolist() == [0, 0]  # what _e2m1_rounding's uint8 cast gives (x86), defined


def test_every_bucket_edge_of_the_table():
    """The first, second and last bit pattern of every one of the table's 2^21-pattern buckets, and the
    pattern before each, in both signs (NaN patterns left to the test above)."""
    k = torch.arange(1024, dtype=torch.int64) << 21
    bits = torch.cat([k, k + 1, k + 2, k - 1, k + (1 << 21) - 1]).clamp(0, 0x7F800000)
    x = bits.to(torch.int32).view(torch.float32)
    _same(torch.cat([x, -x]))


def test_dense_random_values_and_a_strided_sweep_of_all_float32_bit_patterns():
    gen = torch.Generator().manual_seed(18)
    _same(torch.rand(1 << 20, generator=gen) * 16 - 8)
    _same(torch.randn(1 << 18, generator=gen) * torch.rand(1 << 18, generator=gen).mul(40).sub(30).exp2())
    bits = torch.arange(0, 1 << 32, 4093, dtype=torch.int64)  # ~1M patterns, every exponent and sign
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~x.isnan()]
    _same(x)


def test_other_layouts_and_dtypes_and_the_out_argument():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 48, generator=gen) * 14 - 7
    want = nvfp4._e2m1_rounding(x)
    assert torch.equal(nvfp4.e2m1_codes(x.t()), want.t())  # not contiguous
    assert torch.equal(nvfp4.e2m1_codes(x.reshape(64, 3, 16)), want.reshape(64, 3, 16))
    assert torch.equal(nvfp4.e2m1_codes(x.to(torch.bfloat16)), nvfp4._e2m1_rounding(x.to(torch.bfloat16)))
    near = torch.tensor([0.25 + 2.0 ** -40, 5.0 + 2.0 ** -40], dtype=torch.float64)  # ties once cast to float32
    assert nvfp4.e2m1_codes(near).tolist() == [1, 7] and nvfp4.e2m1_codes(near.float()).tolist() == [0, 6]
    out = torch.full((64, 48), 99, dtype=torch.uint8)
    assert nvfp4.e2m1_codes(x, out=out) is out and torch.equal(out, want)
