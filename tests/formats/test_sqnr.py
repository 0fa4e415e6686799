"""Tier 2 (statistical): SQNR floors on N(0, 0.02) weights of shape 256x1024.

Measured over 20 seeds (mean / standard deviation, dB); each floor is the mean minus about 6 sd,
rounded down, so a real regression fails and noise does not:
    int8 ch sym      42.09 / 0.047    int4 g128 asym  19.95 / 0.023   int3 g64 asym  14.20 / 0.017
    int8 tensor sym  39.48 / 0.315    int4 g32 asym   21.85 / 0.017   int2 g32 asym   7.83 / 0.017
    nf4 g64 (dq)     20.73 / 0.015    int4 g128 sym   18.62 / 0.023
    fp8 e4m3 ch      31.57 / 0.017    fp8 e5m2 ch     25.58 / 0.013
"""

import pytest
import torch

from lowbit.formats import QuantSpec, qdq

CASES = [
    (QuantSpec(kind="int", bits=8), 41.8),
    (QuantSpec(kind="int", bits=8, granularity="tensor"), 37.5),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=128, symmetric=False, scale_dtype="float16"), 19.8),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False, scale_dtype="float16"), 21.7),
    (QuantSpec(kind="int", bits=4, granularity="group", group_size=128), 18.4),
    (QuantSpec(kind="int", bits=3, granularity="group", group_size=64, symmetric=False), 14.0),
    (QuantSpec(kind="int", bits=2, granularity="group", group_size=32, symmetric=False), 7.7),
    (QuantSpec(kind="nf4", bits=4, granularity="group", group_size=64, double_quant=True), 20.6),
    (QuantSpec(kind="fp8_e4m3", bits=8), 31.4),
    (QuantSpec(kind="fp8_e5m2", bits=8), 25.4),
]


@pytest.mark.parametrize("spec, floor", CASES, ids=[c[0].label for c in CASES])
@pytest.mark.parametrize("seed", [101, 202])
def test_sqnr_floor(spec, floor, seed):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(seed)) * 0.02
    err = w - qdq(w, spec)
    sqnr = 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum()).item()
    assert sqnr >= floor


def test_more_bits_and_smaller_groups_help():
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(3))
    def err(**kw):
        return (w - qdq(w, QuantSpec(kind="int", symmetric=False, **kw))).pow(2).mean().item()
    assert err(bits=8, granularity="channel") < err(bits=4, granularity="group", group_size=32) \
        < err(bits=4, granularity="group", group_size=128) < err(bits=4, granularity="channel")
    assert err(bits=4, granularity="group", group_size=64) < err(bits=3, granularity="group", group_size=64) \
        < err(bits=2, granularity="group", group_size=64)
