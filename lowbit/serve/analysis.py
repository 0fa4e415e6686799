"""Automated canary analysis: the gate's criteria, judged on live traffic over a sliding window.

Every `window` events (shadow pairs scored, or candidate requests answered) the window is judged:
- quality.max_mean_kld, max_p99_kld, max_sample_kld, min_top1_agreement: on the shadow pairs' scores;
- quality.suites.json.min_valid_pct / max_valid_drop: on the pairs where JSON was asked for;
- latency.p95_improvement_pct: the candidate's p95 latency against the fallback's, both in the window;
- always: the share of candidate requests that raised or timed out, at most `max_failure_pct`.
A criterion with no data in the window is reported as not judged and does not fail it; but the share
steps up only once the shadow's quality scores are in (so --spec without --shadow can roll back on
errors and latency, never step up). When every judged criterion holds, the share steps up by `step_pct` (to `max_canary`); after `max_failures`
failing windows in a row it drops to 0 (rollback) and stays there until changed by hand. Every
decision, with its evidence, goes to the log and the run registry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from lowbit.eval.gate import Spec
from lowbit.serve.guard import ERROR, ROUTED, TIMEOUT
from lowbit.serve.routing import Router
from lowbit.serve.shadow import PairScore, quantile, summarize

log = logging.getLogger("lowbit.serve")

MAX_FAILURE_PCT = 5.0
NOT_LIVE = ("max_ppl_increase_pct",)  # needs reference text, not live traffic


def _row(name: str, value, op: str, threshold: float, detail: str = "", required: bool = False) -> dict:
    """required: the share may not step up until this criterion has data (the shadow's quality scores);
    the others (JSON, latency, errors) may simply not apply to the traffic of a window."""
    if value is None:
        return {"name": name, "value": None, "op": op, "threshold": threshold, "passed": None, "required": required,
                "detail": (detail + "; " if detail else "") + "no data in this window: not judged"}
    ok = value <= threshold if op == "<=" else value >= threshold
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": bool(ok), "required": required,
            "detail": detail}


class CanaryAnalysis:
    def __init__(self, spec: Spec, router: Router, window: int, step_pct: float, max_canary: float,
                 max_failures: int, record: Callable[[dict], None] | None = None,
                 max_failure_pct: float = MAX_FAILURE_PCT) -> None:
        self.spec, self.router = spec, router
        self.window, self.step, self.max_canary, self.max_failures = window, step_pct, max_canary, max_failures
        self.max_failure_pct = max_failure_pct
        self.record = record
        self.lock = threading.Lock()
        self.pairs: deque[PairScore] = deque(maxlen=window)
        self.requests: deque[tuple[str, float, str]] = deque(maxlen=4 * window)  # (model role, seconds, reason)
        self.new_events = 0
        self.failures = 0
        self.rolled_back = False
        self.decisions: list[dict] = []

    def observe_pair(self, score: PairScore) -> None:
        with self.lock:
            self.pairs.append(score)
            self.new_events += 1
        self._maybe_judge()

    def observe_request(self, role: str, seconds: float, reason: str) -> None:
        """role: 'candidate' when the candidate was asked (whatever happened), 'fallback' when only the
        fallback was; reason: guard's reason for the answer."""
        with self.lock:
            self.requests.append((role, seconds, reason))
            if role == "candidate":
                self.new_events += 1
        self._maybe_judge()

    def _maybe_judge(self) -> None:
        with self.lock:
            if self.new_events < self.window or self.rolled_back:
                return
            self.new_events = 0
            rows = self.rows()
        self.decide(rows)

    def rows(self) -> list[dict]:
        """The window judged against the spec (call with the lock held)."""
        s = summarize(list(self.pairs))
        q = self.spec.section("quality")
        rows = []
        for key, name, value, op in (("max_mean_kld", "mean KLD", s["mean_kld"], "<="),
                                     ("max_p99_kld", "p99 token KLD", s["p99_kld"], "<="),
                                     ("max_sample_kld", "worst answer's mean KLD", s["max_sample_kld"], "<="),
                                     ("min_top1_agreement", "top-1 agreement", s["top1"], ">=")):
            if key in q:
                rows.append(_row(name, value, op, q[key], f"{s['pairs']} shadow pairs, {s['tokens']} tokens",
                                 required=True))
        js = self.spec.suites.get("json") or {}
        cand, fb = s["candidate_json_valid_pct"], s["fallback_json_valid_pct"]
        if "min_valid_pct" in js:
            rows.append(_row("JSON valid %", cand, ">=", js["min_valid_pct"], f"{s['json_pairs']} JSON pairs"))
        if "max_valid_drop" in js:
            rows.append(_row("JSON valid drop (points)", None if cand is None else fb - cand, "<=", js["max_valid_drop"],
                             f"{s['json_pairs']} JSON pairs"))
        cands = [r for r in self.requests if r[0] == "candidate"]
        lat = self.spec.section("latency")
        if "p95_improvement_pct" in lat:
            c95 = quantile([t for role, t, why in cands if why == ROUTED], 0.95)  # the candidate's own answers
            f95 = quantile([t for role, t, why in self.requests if role == "fallback"], 0.95)
            imp = None if c95 is None or not f95 else 100 * (f95 - c95) / f95
            rows.append(_row("p95 latency improvement %", imp, ">=", lat["p95_improvement_pct"],
                             f"candidate p95 {c95}, fallback p95 {f95} (seconds)"))
        fails = sum(1 for r in cands if r[2] in (ERROR, TIMEOUT))
        rows.append(_row("candidate errors + timeouts %", 100 * fails / len(cands) if cands else None, "<=",
                         self.max_failure_pct, f"{fails} of {len(cands)} candidate requests"))
        return rows

    def decide(self, rows: list[dict]) -> dict:
        failed = [r for r in rows if r["passed"] is False]
        waiting = [r for r in rows if r["passed"] is None and r.get("required")]
        before = self.router.share
        if failed:
            self.failures += 1
            if self.failures >= self.max_failures:
                action, after = "rollback", 0.0
                self.rolled_back = True
            else:
                action, after = "hold", before
        elif waiting:  # no evidence of quality yet (no shadow pairs): neither up nor a failure
            action, after = "hold", before
        else:
            self.failures = 0
            after = min(self.max_canary, before + self.step)
            action = "step_up" if after > before else "hold"  # at the maximum already: the window held
        if after != before:
            self.router.set_share(after, f"canary analysis: {action}")
        decision = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action,
                    "share_before": before, "share_after": after, "failing_windows": self.failures,
                    "criteria": rows, "spec": self.spec.source}
        with self.lock:
            self.decisions = (self.decisions + [decision])[-200:]
        log.info("canary analysis: %s, share %g%% -> %g%%; failed: %s", action, before, after,
                 ", ".join(f"{r['name']} {r['value']:.4g} {r['op']} {r['threshold']:g}" for r in failed) or "none")
        if self.record:
            try:
                self.record(decision)
            except Exception as e:
                log.warning("could not record the canary decision in the run registry: %s", e)
        return decision
