"""Float zero domain (x = s*q + m), act-order permutations and static int8 activation specs."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import QuantSpec, affine, dequantize_tensor, quantize_tensor
from lowbit.formats.qtensor import int_qtensor


def _q41_grid(rows: int, groups: int, gs: int = 32, seed: int = 0) -> torch.Tensor:
    """Weights exactly on a GGUF Q4_1 grid: x = d*q + m with fp16 d, m and q in 0..15 using both ends."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(rows, groups, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(rows, groups, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (rows, groups, gs), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # min and max present, so the group's range is exactly 15 steps
    return (d * q + m).reshape(rows, groups * gs)


def test_float_zero_domain_reproduces_q4_1_grid_exactly():
    w = _q41_grid(8, 4)
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False,
                     zero_domain="float", scale_dtype="float16")
    qt = quantize_tensor(w, spec)
    assert "offset" in qt.tensors and "zero_point" not in qt.tensors
    err = (dequantize_tensor(qt) - w).abs().max().item()
    assert err < 1e-6 * w.abs().max().item() + 1e-7
    int_spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, scale_dtype="float16")
    assert (dequantize_tensor(quantize_tensor(w, int_spec)) - w).abs().max().item() > 100 * max(err, 1e-7)


def test_float_zero_domain_only_for_asymmetric_int():
    with pytest.raises(LowbitError, match="zero_domain"):
        QuantSpec(kind="int", bits=4, symmetric=True, zero_domain="float")
    with pytest.raises(LowbitError, match="zero_domain"):
        QuantSpec(kind="int", bits=4, symmetric=False, zero_domain="fractional")
    assert QuantSpec(kind="int", bits=4, symmetric=False, zero_domain="float").label == "int4 asym-f ch"


@pytest.mark.parametrize("symmetric", [True, False])
def test_permuted_storage_dequantizes_to_input_order(symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=16, symmetric=symmetric)
    perm = torch.randperm(64)
    wp = w[:, perm]
    scale, zero = affine.choose_qparams(wp, spec)
    qt = int_qtensor(spec, affine.quantize(wp, scale, zero, spec), scale, zero, perm)
    plain = dequantize_tensor(quantize_tensor(wp, spec))  # the same codes, stored order
    back = dequantize_tensor(qt)
    assert torch.equal(back[:, perm], plain)
    assert (back - w).abs().max() < 0.5 * w.abs().max()


def test_int8_static_activation_spec():
    s = QuantSpec(kind="int", bits=8, granularity="channel", activation="int8_static")
    assert s.label == "int8 ch a8static"
    with pytest.raises(LowbitError, match="int8_static"):
        QuantSpec(kind="int", bits=4, granularity="channel", activation="int8_static")
