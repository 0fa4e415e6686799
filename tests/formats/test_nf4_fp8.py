import pytest
import torch

from lowbit.formats import QuantSpec, dequantize_tensor, fp8, nf4, quantize_tensor

# QLoRA's published NF4 values (Dettmers et al. 2023, appendix E / bitsandbytes' table).
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_code_table_equals_qlora():
    assert nf4.CODE.tolist() == pytest.approx(QLORA_NF4, abs=1e-6)
    assert nf4.CODE[7].item() == 0.0  # an exact zero


def test_nf4_codes_survive():
    """Weights that are code values times a group absmax come back exactly (no double quant)."""
    spec = QuantSpec(kind="nf4", bits=4, granularity="group", group_size=16)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 32), generator=g)
    codes[:, 0] = 15
    codes[:, 16] = 15  # each group's absmax is its scale
    absmax = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 4.0]])
    x = nf4.CODE[codes] * absmax.repeat_interleave(16, dim=1)
    assert torch.equal(dequantize_tensor(quantize_tensor(x, spec)), x)


def test_double_quant_shrinks_scales_and_stays_close():
    x = torch.randn(128, 512) * 0.02
    plain = quantize_tensor(x, QuantSpec(kind="nf4", bits=4, granularity="group", group_size=64))
    dq = quantize_tensor(x, QuantSpec(kind="nf4", bits=4, granularity="group", group_size=64, double_quant=True))
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert dq.bits_per_weight < 4.14  # 4 + 8/64 + 32/(64*256) + the mean
    err_plain = (dequantize_tensor(plain) - x).pow(2).mean()
    err_dq = (dequantize_tensor(dq) - x).pow(2).mean()
    assert err_dq < err_plain * 1.02


@pytest.mark.parametrize("kind, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_equals_torch_cast(kind, dtype):
    spec = QuantSpec(kind=kind, bits=8, granularity="tensor")
    x = torch.randn(8, 64) * 10
    q = fp8.quantize(x, torch.ones(1, 1), spec)
    assert q.dtype == dtype
    assert torch.equal(q.float(), x.to(dtype).float())
    # with the format's own scale, dequantize equals the cast of x / s, times s
    qt = quantize_tensor(x, spec)
    s = qt.tensors["scale"]
    assert torch.equal(dequantize_tensor(qt), (x / s).to(dtype).float() * s)


def test_fp8_saturates_instead_of_nan():
    spec = QuantSpec(kind="fp8_e4m3", bits=8, granularity="tensor")
    q = fp8.quantize(torch.tensor([[1e6, -1e6, 1.0]]), torch.ones(1, 1), spec)
    assert torch.isfinite(q.float()).all() and q.float()[0, 0].item() == 448.0
