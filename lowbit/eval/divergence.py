"""Baseline vs candidate on identical token streams: perplexity, KL divergence, top-1 agreement,
and the per-sample distribution with the worst samples.

The baseline's side (top-k log-probs, per-token NLL) is cached on disk keyed by the baseline's
weights hash and the exact token ids, so comparing many candidates runs the baseline once.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.eval import metrics
from lowbit.eval.types import Case
from lowbit.model.sources import cache_root

TOPK = 256


@dataclass(frozen=True)
class Sample:
    id: str
    text: str
    ids: torch.Tensor  # (seq,) int64


def check_same_tokenizer(base_tok, cand_tok, base_name: str, cand_name: str) -> None:
    vb, vc = base_tok.get_vocab(), cand_tok.get_vocab()
    if vb != vc:
        diff = len(set(vb.items()) ^ set(vc.items()))
        raise LowbitError(
            f"baseline {base_name} and candidate {cand_name} have different tokenizers (vocabularies of {len(vb)} and "
            f"{len(vc)} tokens, {diff} entries differ); token-level comparison needs the same tokenizer; "
            f"fix: compare a candidate quantized from this baseline")


def make_samples(tokenizer, texts: list[tuple[str, str]], seq_len: int, n: int, min_tokens: int = 32) -> list[Sample]:
    """Up to n samples, each the first seq_len tokens of one text; texts shorter than min_tokens are skipped."""
    out = []
    for sid, text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:seq_len]
        if ids.numel() >= min_tokens:
            out.append(Sample(sid, text, ids))
        if len(out) == n:
            break
    if not out:
        raise LowbitError(f"evaluation text: no sample has at least {min_tokens} tokens; give longer texts")
    return out


def _cache_key(base_sha: str, samples: list[Sample]) -> str:
    h = hashlib.sha256(f"{base_sha}|{TOPK}|v2".encode())
    for s in samples:
        h.update(s.ids.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


@torch.no_grad()
def baseline_side(model, samples: list[Sample], base_sha: str | None, use_cache: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per sample: top-k log-probs and indices (seq-1, k) and the NLL of the true next tokens (seq-1,)."""
    path = cache_dir() / f"{_cache_key(base_sha, samples)}.pt" if (use_cache and base_sha) else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    out = []
    for i, s in enumerate(samples):
        logits = model(s.ids[None]).logits[0, :-1]  # (seq-1, vocab)
        lp, idx = metrics.topk_logprobs(logits, TOPK)
        out.append({"lp": lp, "idx": idx, "nll": metrics.nll(logits, s.ids[1:])})  # fp32: self-KLD is exactly 0
        if progress:
            progress(i + 1, len(samples))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


@torch.no_grad()
def compare(base_model, cand_model, samples: list[Sample], base_sha: str | None = None, worst_n: int = 5,
            use_cache: bool = True, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The run dict's "divergence" entry (see lowbit/eval/types.py)."""
    base = baseline_side(base_model, samples, base_sha, use_cache,
                         (lambda i, n: progress("baseline", i, n)) if progress else None)
    klds, per_sample = [], []
    nll_b = nll_c = 0.0
    agree = count = 0
    for i, (s, b) in enumerate(zip(samples, base)):
        logits = cand_model(s.ids[None]).logits[0, :-1]  # (seq-1, vocab)
        k = metrics.kld_topk(b["lp"].float(), b["idx"], logits)
        a = (logits.argmax(-1) == b["idx"][:, 0].long())
        n_c = metrics.nll(logits, s.ids[1:])
        klds.append(k)
        nll_b += b["nll"].sum().item()
        nll_c += n_c.sum().item()
        agree += a.sum().item()
        count += k.numel()
        per_sample.append({"id": s.id, "text": s.text[:400], "kld": k.mean().item(), "top1": a.float().mean().item(),
                           "ppl_baseline": metrics.perplexity_from_nll(b["nll"].sum().item(), k.numel()),
                           "ppl_candidate": metrics.perplexity_from_nll(n_c.sum().item(), k.numel())})
        if progress:
            progress("candidate", i + 1, len(samples))
    all_k = torch.cat(klds)
    worst = sorted(per_sample, key=lambda r: -r["kld"])[:worst_n]
    return {
        "tokens": count,
        "samples": len(samples),
        "ppl_baseline": metrics.perplexity_from_nll(nll_b, count),
        "ppl_candidate": metrics.perplexity_from_nll(nll_c, count),
        "mean_kld": all_k.mean().item(),
        "p99_kld": metrics.percentile(all_k, 99),
        "max_kld": all_k.max().item(),
        "max_sample_kld": max(r["kld"] for r in per_sample),
        "top1": agree / count,
        "kld_hist": metrics.log_histogram(all_k),
        "per_sample": per_sample,
        "worst": [Case(r["id"], r["text"][:300], round(r["ppl_baseline"], 3), round(r["ppl_candidate"], 3),
                       r["kld"]).__dict__ for r in worst],
    }


def cache_dir() -> Path:
    return cache_root() / "baseline-logits"
