"""Tier 1 (exact): the toy trace, the reference oracle, on-grid values survive."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import QuantSpec, affine, dequantize_tensor, quantize_tensor
from lowbit.formats._reference import affine_quantize_list


def test_toy_trace_symmetric_int8_per_tensor():
    w = torch.tensor([-1.20, -0.45, 0.10, 0.95])
    spec = QuantSpec(kind="int", bits=8, granularity="tensor", symmetric=True)
    scale, zero = affine.choose_qparams(w, spec)
    assert zero is None
    assert scale.item() == pytest.approx(1.20 / 127, rel=1e-7)
    assert round(scale.item(), 5) == 0.00945
    q = affine.quantize(w, scale, zero, spec)
    assert q.reshape(-1).tolist() == [-127, -48, 11, 101]
    w_hat = affine.dequantize(q, scale, zero, spec).reshape(-1)
    assert torch.allclose(w_hat, torch.tensor([-127, -48, 11, 101]) * (1.20 / 127))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), n=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_matches_reference_oracle(bits, symmetric, n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    spec = QuantSpec(kind="int", bits=bits, granularity="tensor", symmetric=symmetric)
    scale, zero = affine.choose_qparams(x, spec)
    q = affine.quantize(x, scale, zero, spec).reshape(-1).tolist()
    r_scale, r_zero, r_q = affine_quantize_list(x.tolist(), bits, symmetric)
    assert scale.item() == pytest.approx(r_scale, rel=1e-6)
    assert (0 if zero is None else zero.item()) == r_zero
    # float32 vs float64 division may differ at exact .5 ties: allow one code off at most there
    assert sum(a != b for a, b in zip(q, r_q)) <= max(1, n // 20)
    assert all(abs(a - b) <= 1 for a, b in zip(q, r_q))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), rows=st.integers(1, 6), groups=st.integers(1, 4),
       gexp=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_on_grid_values_survive(bits, symmetric, rows, groups, gexp, seed):
    """Values already on a group's grid come back bit-exact through quantize -> pack -> dequantize."""
    gs = 2**gexp
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = affine.qrange(bits, symmetric)
    scale = 2.0 ** torch.randint(-8, 0, (rows, groups), generator=g).float()  # powers of two: exact division
    if symmetric:  # scale = amax / qmax, so the grid is s * [-qmax, qmax] (-qmax-1 is never chosen)
        q = torch.randint(-qmax, qmax + 1, (rows, groups, gs), generator=g)
        zero = torch.zeros(rows, groups)
        q[..., 0] = qmax  # the group's amax sits on the top code
    else:
        q = torch.randint(qmin, qmax + 1, (rows, groups, gs), generator=g)
        zero = torch.randint(0, qmax + 1, (rows, groups), generator=g).float()
        if gs >= 2:
            q[..., 0], q[..., 1] = 0, qmax  # the group spans the full code range
        else:
            zero = torch.zeros(rows, groups)
            q[..., 0] = qmax
    x = ((q.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(rows, groups * gs)
    spec = QuantSpec(kind="int", bits=bits, granularity="group", group_size=gs, symmetric=symmetric)
    qt = quantize_tensor(x, spec)
    assert torch.equal(dequantize_tensor(qt), x)


def test_zero_rows_and_constant_groups_are_safe():
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=4, symmetric=False)
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]])
    assert torch.equal(dequantize_tensor(quantize_tensor(x, spec)), x)


def test_fp16_scales_are_used_for_rounding():
    """Codes are computed against the stored (rounded) scale, so dequantize(quantize(x)) is consistent."""
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=8, symmetric=False, scale_dtype="float16")
    x = torch.randn(4, 16)
    qt = quantize_tensor(x, spec)
    assert qt.tensors["scale"].dtype == torch.float16
    again = quantize_tensor(dequantize_tensor(qt), spec)
    assert torch.equal(dequantize_tensor(again), dequantize_tensor(qt))  # idempotent


def test_group_size_must_divide_rows():
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=5)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_tensor(torch.randn(2, 8), spec)
