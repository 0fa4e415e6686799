"""Metrics against hand-computed values, and the top-k KLD bound."""

import math

import pytest
import torch

from lowbit.eval import metrics


def test_kld_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    expect = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # = 0.25 ln 2
    got = metrics.kld(p.log(), q.log()).item()
    assert got == pytest.approx(expect, abs=1e-6)
    assert metrics.kld(p.log(), p.log()).item() == pytest.approx(0, abs=1e-7)


def test_nll_and_perplexity_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 0.0]])
    n = metrics.nll(logits, torch.tensor([2, 0]))
    assert n.tolist() == pytest.approx([math.log(4), math.log(2)], abs=1e-6)
    assert metrics.perplexity_from_nll(n.sum().item(), 2) == pytest.approx(math.sqrt(8), rel=1e-6)


def test_topk_kld_is_exact_with_full_k_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 300, generator=g) * 3
    cand = base + torch.randn(50, 300, generator=g) * 0.5
    exact = metrics.kld(base, cand)
    lp, idx = metrics.topk_logprobs(base, 300)
    assert torch.allclose(metrics.kld_topk(lp, idx, cand), exact, atol=1e-5)
    lp, idx = metrics.topk_logprobs(base, 32)
    approx = metrics.kld_topk(lp, idx, cand)
    assert (approx <= exact + 1e-5).all()
    assert approx.mean() > 0.8 * exact.mean()


def test_percentile_and_histogram():
    v = torch.arange(101, dtype=torch.float32)
    assert metrics.percentile(v, 99) == pytest.approx(99.0)
    assert metrics.percentile(v, 50) == pytest.approx(50.0)
    h = metrics.log_histogram(torch.tensor([1e-7, 1e-3, 1e-2, 0.5]), bins=4)
    assert sum(h["counts"]) == 4 and len(h["edges"]) == 5
