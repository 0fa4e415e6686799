"""Tier 1 (exact): affine's rounding primitives on hand-worked examples.

round_to_grid / grid_values / quantize_symmetric_int8 are the one copy of the integer rounding
rule (quantize, GPTQ, int8 activations, the int8 KV cache and NF4's double quantization call them),
so what they do at ties, at the ends of the range and with a zero point or offset is pinned here.
"""

import torch

from lowbit.formats import QuantSpec, affine, nf4


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_ties_round_half_to_even():
    # x / scale = +-0.5, +-1.5, +-2.5, 3.5: each tie goes to the even neighbour, as torch.round does
    q = affine.round_to_grid(t(0.25, 0.75, 1.25, 1.75, -0.25, -0.75, -1.25), 0.5, -8, 7)
    assert q.tolist() == [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0]


def test_clamps_at_both_ends():
    # 4-bit signed range [-8, 7]: -8.4 and 7.4 round inside, -8.6 / 7.6 / +-100 / +-inf clamp
    x = t(-100.0, -8.6, -8.4, 7.4, 7.6, 100.0, float("-inf"), float("inf"))
    assert affine.round_to_grid(x, 1.0, -8, 7).tolist() == [-8, -8, -8, 7, 7, 7, -8, 7]


def test_int_zero_point_is_added_after_rounding():
    # scale 0.5, zero 3, range [0, 15]: x / s = -4, -3, -0.5, 0, 0.5, 1.5, 12
    x = t(-2.0, -1.5, -0.25, 0.0, 0.25, 0.75, 6.0)
    q = affine.round_to_grid(x, 0.5, 0, 15, zero=torch.tensor(3.0))
    # 0.5 rounds to 0 and then moves to 3; rounding x / s + z = 3.5 would have given 4
    assert q.tolist() == [0, 0, 3, 3, 3, 5, 15]
    assert affine.grid_values(q, 0.5, zero=torch.tensor(3.0)).tolist() == [-1.5, -1.5, 0, 0, 0, 1, 6]


def test_float_offset_is_subtracted_before_dividing():
    # offset -1.25, scale 0.5: (x - m) / s = 0, 0.5, 1.5, 2.5, 15, 202.5
    m = torch.tensor(-1.25)
    x = t(-1.25, -1.0, -0.5, 0.0, 6.25, 100.0)
    q = affine.round_to_grid(x, 0.5, 0, 15, offset=m)
    assert q.tolist() == [0, 0, 2, 2, 15, 15]
    assert affine.grid_values(q, 0.5, offset=m).tolist() == [-1.25, -1.25, -0.25, -0.25, 6.25, 6.25]


def test_per_row_scales_and_zero_points_broadcast():
    x = t(1.0, -1.0, 0.5).expand(2, 3)
    scale, zero = t(0.5, 0.25).reshape(2, 1), t(8.0, 2.0).reshape(2, 1)
    q = affine.round_to_grid(x, scale, 0, 15, zero=zero)
    assert q.tolist() == [[10, 6, 9], [6, 0, 4]]  # row 1: 4 - 4 + 2 = -2 clamps to 0
    assert affine.grid_values(q, scale, zero=zero).tolist() == [[1.0, -1.0, 0.5], [1.0, -0.5, 0.5]]


def test_on_grid_values_round_trip_exactly():
    scale, zero = torch.tensor(0.375), torch.tensor(5.0)
    codes = torch.arange(16, dtype=torch.float32)
    x = affine.grid_values(codes, scale, zero=zero)
    assert torch.equal(affine.round_to_grid(x, scale, 0, 15, zero=zero), codes)


def test_inputs_are_never_written():
    x = t(0.3, -1.7, 2.5)
    m, z = torch.tensor(-0.5), torch.tensor(1.0)
    for kw in ({}, {"zero": z}, {"offset": m}):
        q = affine.round_to_grid(x, 0.5, -8, 7, **kw)
        assert q.data_ptr() != x.data_ptr()
        assert x.tolist() == t(0.3, -1.7, 2.5).tolist()
    q = t(1.0, 2.0)
    affine.grid_values(q, 0.5, zero=z, offset=m)
    assert q.tolist() == [1.0, 2.0]


def test_symmetric_int8_ties_and_range():
    q = affine.quantize_symmetric_int8(t(0.5, 1.5, -0.5, -1.5, 126.5, -126.5, 126.4), 1.0)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 0, -2, 126, -126, 126]
    ends = t(127.4, 127.6, 1e6, float("inf"), -127.4, -127.6, -128.0, -1e6, float("-inf"))
    assert affine.quantize_symmetric_int8(ends, 1.0).tolist() == [127, 127, 127, 127, -127, -127, -127, -127, -127]


def test_symmetric_int8_never_produces_minus_128_and_is_odd():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 300  # mostly far outside the range
    q = affine.quantize_symmetric_int8(x, 1.0)
    assert q.min().item() == -127 and q.max().item() == 127
    assert torch.equal(affine.quantize_symmetric_int8(-x, 1.0), -q)


def test_quantize_uses_the_same_rule_and_its_own_range():
    # int zero domain through affine.quantize: the tie at x / s = 0.5 stays on the zero point
    spec = QuantSpec(bits=4, granularity="channel", symmetric=False)
    q = affine.quantize(t(0.25, 0.75).reshape(1, 2), t(0.5).reshape(1, 1), torch.tensor([[3]], dtype=torch.uint8), spec)
    assert q.dtype == torch.uint8 and q.tolist() == [[3, 5]]
    # symmetric int8 weights keep qrange's -128 (x / s = -128.5 rounds to the even -128); the int8
    # helper for activations stops at -127
    spec = QuantSpec(bits=8, granularity="tensor", symmetric=True)
    assert affine.quantize(t(-64.25, -65.0), t(0.5).reshape(1, 1), None, spec).tolist() == [[-128, -128]]
    assert affine.quantize_symmetric_int8(t(-64.25, -65.0), 0.5).tolist() == [-127, -127]


def test_nf4_double_quant_ties_go_to_even():
    # 256 absmax values with mean exactly 0.5 and centered amax 127 * 2**-8, so the block scale is
    # exactly 2**-8 and the centered values +-0.5 and +-1.5 of it are exact ties
    u = 2.0 ** -8
    absmax = torch.full((256,), 0.5)
    absmax[:6] = 0.5 + t(127, -127, 0.5, -0.5, 1.5, -1.5) * u
    q, scale, mean = nf4.double_quantize(absmax)
    assert mean.item() == 0.5 and scale.tolist() == [u]
    assert q.dtype == torch.int8 and q[0, :7].tolist() == [127, -127, 0, 0, 2, -2, 0]
