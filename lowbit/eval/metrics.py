"""Pure metric functions on logits and log-probabilities (no models, no I/O).

KL divergence is KL(P_baseline || P_candidate) per token: the information lost when the candidate's
next-token distribution stands in for the baseline's. The cached form keeps the baseline's top-k
log-probs and folds the rest of the vocabulary into one "tail" bucket; by the log-sum inequality
that is a lower bound of the full KL, exact when k covers the vocabulary: what it leaves out is the
KL within the tail weighted by the tail's probability mass, so the gap shrinks as the top k tokens
hold more of the baseline's mass (tests/eval/test_metrics.py checks the bound on random logits).
"""

from __future__ import annotations

import math

import torch


def kld(base_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(P || Q) from logits (..., vocab) -> (...)."""
    lp = base_logits.float().log_softmax(-1)
    lq = cand_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k most likely tokens' log-probs, (..., k) each, sorted descending."""
    lp = logits.float().log_softmax(-1)
    v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return v, i.to(torch.int32)


def kld_topk(base_lp: torch.Tensor, base_idx: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) with P known on its top-k tokens plus one tail bucket -> (...)."""
    lq_all = cand_logits.float().log_softmax(-1)
    lq = lq_all.gather(-1, base_idx.long())  # (..., k)
    p = base_lp.exp()
    head = (p * (base_lp - lq)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - lq.exp().sum(-1)).clamp(min=0)
    tiny = 1e-12
    tail = torch.where(p_tail > tiny, p_tail * (torch.log(p_tail.clamp(min=tiny)) - torch.log(q_tail.clamp(min=tiny))),
                       torch.zeros_like(p_tail))
    return (head + tail).clamp(min=0)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of targets: logits (..., vocab), targets (...) -> (...)."""
    return -logits.float().log_softmax(-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def perplexity_from_nll(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; 0.0 for an empty tensor."""
    if values.numel() == 0:
        return 0.0
    return torch.quantile(values.float().reshape(-1), q / 100).item()


def log_histogram(values: torch.Tensor, bins: int = 40, lo: float = 1e-6) -> dict:
    """Histogram on log-spaced edges from lo to max (values below lo land in the first bin)."""
    v = values.float().reshape(-1).clamp(min=lo)
    hi = max(v.max().item() if v.numel() else lo * 10, lo * 10)
    edges = torch.logspace(math.log10(lo), math.log10(hi), bins + 1)
    counts = torch.histc(torch.log10(v), bins=bins, min=math.log10(lo), max=math.log10(hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
