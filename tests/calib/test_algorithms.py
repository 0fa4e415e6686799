"""GPTQ, AWQ, SmoothQuant and MSE clipping on synthetic layers with correlated inputs and outlier channels."""

from __future__ import annotations

import pytest
import torch

from lowbit.calib import awq, clip, gptq, smoothquant
from lowbit.formats import affine
from lowbit.formats.qtensor import dequantize_tensor, int_qtensor, qdq, quantize_tensor
from lowbit.formats.spec import QuantSpec

W4G32 = QuantSpec(kind="int", bits=4, granularity="group", group_size=32, symmetric=False)
W3CH = QuantSpec(kind="int", bits=3, granularity="channel", symmetric=True)


def layer(seed: int = 0, n: int = 1024, d: int = 128, out: int = 64):
    """Inputs with a low-rank (correlated) structure plus a few outlier channels, and a weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.2 * torch.randn(n, d, generator=g)
    x[:, [3, 40, 77]] *= 15  # outlier channels
    w = torch.randn(out, d, generator=g) * 0.05
    return x, w


def out_err(x, w, w_hat) -> float:
    return (x @ (w - w_hat).t()).pow(2).mean().item()


@pytest.mark.parametrize("spec,act_order", [(W4G32, True), pytest.param(W4G32, False, marks=pytest.mark.slow),
                                            pytest.param(W3CH, True, marks=pytest.mark.slow), pytest.param(W3CH, False, marks=pytest.mark.slow)])
def test_gptq_beats_rtn(spec, act_order):
    x, w = layer()
    H = gptq.Hessian.empty(x.shape[1])
    for chunk in x.split(300):  # streaming accumulation equals the one-shot 2/n X^T X
        H.add(chunk)
    torch.testing.assert_close(H.full(), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    qt = gptq.gptq_quantize(w, H.full(), spec, block_size=32, act_order=act_order)
    rtn = out_err(x, w, qdq(w, spec))
    err = out_err(x, w, dequantize_tensor(qt))
    assert err < 0.5 * rtn, (err, rtn)  # measured: 0.02-0.10x of RTN's error on this layer
    assert ("perm" in qt.tensors) == (act_order and spec.granularity == "group")


def test_gptq_act_order_layout_is_consistent():
    """Stored codes in permuted order + perm reproduce the weight the GPTQ loop settled on."""
    x, w = layer(1)
    H = 2 * x.t() @ x / x.shape[0]
    qt = gptq.gptq_quantize(w, H, W4G32, act_order=True)
    perm = qt.tensors["perm"].long()
    assert sorted(perm.tolist()) == list(range(w.shape[1]))
    # the most important input (largest diag H) is stored first
    assert perm[0].item() == torch.argmax(torch.diag(H)).item()
    wd = dequantize_tensor(qt)
    assert (w - wd).abs().max() < 0.5  # a reconstruction of w, in input order


def test_singular_hessian_raises_for_fallback():
    x, w = layer(2)
    H = -(2 * x.t() @ x / x.shape[0])  # negative definite: no Cholesky factor exists
    with pytest.raises(gptq.HessianError):
        gptq.gptq_quantize(w, H, W4G32)


def test_dead_inputs_are_zeroed():
    x, w = layer(3)
    x[:, 5] = 0
    qt = gptq.gptq_quantize(w, 2 * x.t() @ x / x.shape[0], W4G32)
    assert dequantize_tensor(qt)[:, 5].abs().max() < 0.02  # zero up to the group's rounding step


@pytest.mark.slow
def test_awq_beats_rtn_and_grid_includes_identity():
    x, w = layer(4)
    ws = [w, w.flip(0) * 1.3]
    specs = [W4G32, W4G32]
    s, ratio, _ = awq.search_scales(x, ws, specs, grid=10)
    rtn = sum(out_err(x, wi, qdq(wi, W4G32)) for wi in ws)
    scaled = sum(out_err(x, wi, qdq(wi * s, W4G32) / s) for wi in ws)
    assert ratio > 0  # the outlier channels make a non-trivial scale worth it
    assert scaled < 0.8 * rtn, (scaled, rtn)
    assert s[[3, 40, 77]].mean() > s.median()  # outlier inputs get their weights scaled up


@pytest.mark.slow
def test_clip_search_never_worse_than_rtn():
    x, w = layer(5)
    w[0, 0] = 1.0  # one weight outlier stretches its group's step
    for kw in ({}, {"importance": x.pow(2).mean(0)}, {"x": x[:256]}):
        scale, zero = clip.clip_search(w, W4G32, **kw)
        wq = affine.dequantize(affine.quantize(w, scale, zero, W4G32), scale, zero, W4G32)
        if "x" in kw:
            assert out_err(x, w, wq) <= out_err(x, w, qdq(w, W4G32)) * 1.0001
        else:
            imp = kw.get("importance", torch.ones(w.shape[1]))
            err = ((w - wq).pow(2) * imp).sum()
            assert err <= ((w - qdq(w, W4G32)).pow(2) * imp).sum() * 1.0001
    scale, zero = clip.clip_search(w, W4G32)
    assert (scale.float() < affine.choose_qparams(w, W4G32)[0].float()).any()  # some group was clipped


def test_smoothquant_reduces_activation_range():
    x, w = layer(6)
    s = smoothquant.smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    xs, ws = x / s, w * s
    ratio = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).median()).item()  # noqa: E731
    assert ratio(xs) < 0.3 * ratio(x)  # outlier channels flattened
    torch.testing.assert_close(xs @ ws.t(), x @ w.t(), rtol=1e-4, atol=1e-3)  # same function
    # and static int8 activations then lose less
    def a8(t):
        sc = t.abs().max() / 127
        return torch.round(t / sc).clamp(-127, 127) * sc
    spec = QuantSpec(kind="int", bits=8, granularity="channel")
    e_plain = (a8(x) @ qdq(w, spec).t() - x @ w.t()).pow(2).mean()
    e_smooth = (a8(xs) @ qdq(ws, spec).t() - x @ w.t()).pow(2).mean()
    assert e_smooth < 0.5 * e_plain


def test_int_qtensor_roundtrip_of_gptq_codes():
    _, w = layer(7)
    qt = quantize_tensor(w, W4G32)
    again = int_qtensor(W4G32, affine.quantize(w, qt.tensors["scale"], qt.tensors["zero_point"], W4G32),
                        qt.tensors["scale"], qt.tensors["zero_point"])
    assert torch.equal(again.tensors["qdata"], qt.tensors["qdata"])


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize("d", [128, 93])
def test_inverse_cholesky_factor_is_upper_and_inverts_the_damped_hessian(ordered, consume, d, monkeypatch):
    monkeypatch.setattr(gptq, "ROWS", 5)  # several row blocks, a short last one, and (d=93) a middle row
    x, _ = layer(5, d=d)
    x[:, 9] = 0  # a dead input: its diagonal becomes 1 before damping
    H = (2 * x.t() @ x / x.shape[0]).double()
    order = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(1)) if ordered else None
    kept = H.clone()
    U = gptq.inverse_cholesky(H, 0.01, order, consume)
    if consume:
        assert U.data_ptr() == H.data_ptr()  # written over the Hessian: no second (in, in) matrix kept
    else:
        assert torch.equal(H, kept)  # the caller's Hessian is not touched
    Hp = kept if order is None else kept[order][:, order]
    fixed = torch.where(Hp.diag() == 0, torch.ones_like(Hp.diag()), Hp.diag())
    damped = Hp.clone()
    damped.diagonal().copy_(fixed + 0.01 * fixed.mean())
    assert torch.equal(U, U.triu())
    assert torch.allclose(U.t() @ U, torch.linalg.inv(damped), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("d", [300, 1100])
def test_hessian_from_upper_blocks_equals_the_whole_product(d, monkeypatch):
    monkeypatch.setattr(gptq, "SYM_BLOCK", 128)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(700, d, generator=g)
    H = gptq.Hessian.empty(d)
    assert len(H.cuts) - 1 == d // 128 and H.cuts[-1] == d
    for chunk in x.split(250):
        H.add(chunk)
    H.H /= 2.0  # a rescale (as AWQ's folding does) before the mirror applies to every block alike
    full = H.full()
    torch.testing.assert_close(full, x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(full, full.t())
    H.add(x[:10])  # more samples after a read: mirrored again on the next read
    assert torch.equal(H.full(), H.full().t())
