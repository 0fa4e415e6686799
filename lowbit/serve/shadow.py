"""Shadow mode: a request answered by one model is replayed to the other, off the client's path,
and the pair is scored.

The scores, per pair:
- token agreement: the share of positions where both answers hold the same token (over the longer one);
- KL divergence of the candidate from the fallback on the fallback's own answer: the fallback's answer
  is teacher-forced through both models and KL(fallback || candidate) taken per token; top-1 agreement
  on the same positions;
- JSON validity of each answer, where JSON was asked for.

Work is bounded twice: a pair that finds the scorer's queue full is dropped (counted), and the
model work it needs runs as shadow jobs, which the workers run only while no client waits and drop
as soon as one arrives (engine.ModelWorker). Aggregates go to the run registry every
`record_every` pairs and at shutdown, as runs of kind "serve".
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from lowbit.serve.engine import Cancelled, GenParams, GenResult, ModelWorker
from lowbit.serve.guard import JsonAsk, json_problem

log = logging.getLogger("lowbit.serve")


@dataclass
class PairScore:
    tokens: int  # positions of the fallback's answer scored for KL
    mean_kld: float | None
    max_kld: float | None
    top1: float | None
    token_agreement: float
    json_asked: bool
    candidate_json_ok: bool | None
    fallback_json_ok: bool | None
    candidate_mean_logprob: float | None
    token_klds: list[float] = field(default_factory=list)


def token_agreement(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


def kl_rows(ref_logp: torch.Tensor, cand_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(ref || cand) and whether the argmaxes agree. Vocabularies padded to different
    sizes are compared on their common part."""
    v = min(ref_logp.shape[-1], cand_logp.shape[-1])
    p, q = ref_logp[:, :v], cand_logp[:, :v]
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
    return kl, p.argmax(-1) == q.argmax(-1)


def score_pair(prompt_ids: list[int], cand: GenResult, fb: GenResult, fb_logp: torch.Tensor | None,
               cand_logp: torch.Tensor | None, ask: JsonAsk | None) -> PairScore:
    kld = top1 = mx = None
    klds: list[float] = []
    if fb_logp is not None and cand_logp is not None and fb_logp.shape[0]:
        kl, agree = kl_rows(fb_logp, cand_logp)
        klds = kl.tolist()
        kld, mx, top1 = float(kl.mean()), float(kl.max()), float(agree.float().mean())
    return PairScore(len(klds), kld, mx, top1, token_agreement(cand.token_ids, fb.token_ids), ask is not None,
                     None if ask is None else json_problem(cand.text, ask) is None,
                     None if ask is None else json_problem(fb.text, ask) is None, cand.mean_logprob, klds)


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(pairs: list[PairScore]) -> dict:
    """Aggregates over pairs: token-weighted KLD and top-1, tails, agreement, JSON validity, and the
    candidate's mean log-prob quantiles (where a --min-logprob threshold would cut)."""
    toks = [k for p in pairs for k in p.token_klds]
    scored = [p for p in pairs if p.tokens]
    n_tok = sum(p.tokens for p in scored)
    js = [p for p in pairs if p.json_asked]
    lps = [p.candidate_mean_logprob for p in pairs if p.candidate_mean_logprob is not None]
    return {
        "pairs": len(pairs),
        "tokens": n_tok,
        "mean_kld": sum(toks) / len(toks) if toks else None,
        "p99_kld": quantile(toks, 0.99),
        "max_sample_kld": max((p.mean_kld for p in scored), default=None),
        "top1": sum(p.top1 * p.tokens for p in scored) / n_tok if n_tok else None,
        "token_agreement": _mean(p.token_agreement for p in pairs),
        "json_pairs": len(js),
        "candidate_json_valid_pct": 100 * _mean(p.candidate_json_ok for p in js) if js else None,
        "fallback_json_valid_pct": 100 * _mean(p.fallback_json_ok for p in js) if js else None,
        "candidate_mean_logprob_p05": quantile(lps, 0.05),
        "candidate_mean_logprob_p50": quantile(lps, 0.5),
    }


@dataclass
class Pair:
    prompt_ids: list[int]
    params: GenParams
    ask: JsonAsk | None
    cand: GenResult | None
    fb: GenResult | None


class ShadowScorer:
    """A background thread scoring pairs from a bounded queue; never blocks the caller."""

    def __init__(self, candidate: ModelWorker, fallback: ModelWorker, queue_size: int, max_tokens: int,
                 on_score: Callable[[PairScore], None] | None = None, record: Callable[[dict], None] | None = None,
                 record_every: int = 50, job_timeout_s: float = 120.0) -> None:
        self.cand_w, self.fb_w = candidate, fallback
        self.q: queue.Queue[Pair | None] = queue.Queue(maxsize=queue_size)
        self.max_tokens, self.on_score, self.record, self.record_every = max_tokens, on_score, record, record_every
        self.job_timeout_s = job_timeout_s
        self.pairs: deque[PairScore] = deque(maxlen=10_000)  # all-time aggregates read the last 10,000
        self.counts = {"submitted": 0, "scored": 0, "dropped_full": 0, "dropped_preempted": 0, "failed": 0}
        self.since_record = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="lowbit-serve-shadow", daemon=True)
        self.thread.start()

    def submit(self, pair: Pair) -> bool:
        """Queue a pair for scoring; False (and counted) when the queue is full: dropped, not waited for."""
        try:
            self.q.put_nowait(pair)
        except queue.Full:
            with self.lock:
                self.counts["dropped_full"] += 1
            return False
        with self.lock:
            self.counts["submitted"] += 1
        return True

    def _run(self, worker: ModelWorker, fn) -> Any:
        job = worker.submit(fn, shadow=True)
        try:
            return job.future.result(timeout=self.job_timeout_s)
        except BaseException:
            job.cancelled.set()
            raise

    def score(self, pair: Pair) -> PairScore:
        params = replace(pair.params, max_tokens=min(pair.params.max_tokens, self.max_tokens), top_logprobs=0)
        if pair.cand is None:
            pair.cand = self._run(self.cand_w, lambda b, stop: b.generate(pair.prompt_ids, params, should_stop=stop))
        if pair.fb is None:
            pair.fb = self._run(self.fb_w, lambda b, stop: b.generate(pair.prompt_ids, params, should_stop=stop))
        answer = pair.fb.token_ids[: self.max_tokens]
        fb_logp = cand_logp = None
        if answer:
            fb_logp = self._run(self.fb_w, lambda b, stop: b.answer_logprobs(pair.prompt_ids, answer))
            cand_logp = self._run(self.cand_w, lambda b, stop: b.answer_logprobs(pair.prompt_ids, answer))
        return score_pair(pair.prompt_ids, pair.cand, pair.fb, fb_logp, cand_logp, pair.ask)

    def _loop(self) -> None:
        while True:
            pair = self.q.get()
            if pair is None:
                return
            try:
                s = self.score(pair)
            except Cancelled:
                with self.lock:
                    self.counts["dropped_preempted"] += 1
                continue
            except Exception as e:  # a failed shadow replay must never reach a client
                with self.lock:
                    self.counts["failed"] += 1
                log.warning("shadow scoring failed: %s", e)
                continue
            with self.lock:
                self.pairs.append(s)
                self.counts["scored"] += 1
                self.since_record += 1
                due = self.since_record >= self.record_every
            if self.on_score:
                try:
                    self.on_score(s)
                except Exception as e:
                    log.warning("canary analysis failed on a shadow score: %s", e)
            if due:
                self.flush()

    def summary(self) -> dict:
        with self.lock:
            pairs = list(self.pairs)
            counts = dict(self.counts)
        return {**summarize(pairs), "counts": counts}

    def flush(self) -> None:
        """Record the aggregates now (when anything was scored since the last record)."""
        with self.lock:
            if not self.since_record:
                return
            self.since_record = 0
        if self.record:
            try:
                self.record(self.summary())
            except Exception as e:
                log.warning("could not record shadow scores in the run registry: %s", e)

    def idle(self) -> bool:
        return self.q.empty()

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout=timeout)
        self.flush()


def wait_idle(scorer: ShadowScorer, timeout: float) -> bool:
    """For tests and benchmarks: wait until the queue is drained and the last pair is done."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with scorer.lock:
            c = scorer.counts
            done = c["scored"] + c["dropped_preempted"] + c["failed"]
        if scorer.q.empty() and done >= c["submitted"]:
            return True
        time.sleep(0.02)
    return False
