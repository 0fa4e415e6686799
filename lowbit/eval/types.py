"""Result types shared by the evaluation suites, the gate, the reports and the run registry.

Everything here converts to plain JSON (`to_dict`) because runs are stored in SQLite and rendered
into HTML/Markdown reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Case:
    """One example shown among a suite's worst cases."""

    id: str
    text: str  # the prompt or sample text (shortened for display)
    baseline: Any  # the baseline's output or score
    candidate: Any  # the candidate's output or score
    score: float  # how bad for the candidate: higher is worse (used to sort)


@dataclass
class SuiteResult:
    name: str  # "general", "jargon", "long_context", "tool_calling", "user:<file name>"
    metric: str  # the headline metric, e.g. "ppl", "json_valid_pct"
    baseline: float
    candidate: float
    higher_is_better: bool
    n: int  # samples evaluated
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {metric: {"baseline": x, "candidate": y}}
    worst: list[Case] = field(default_factory=list)
    notes: str = ""
    skipped: str = ""  # why the suite could not judge the candidate here (its criteria read "n/a", not pass)

    @property
    def delta(self) -> float:
        return self.candidate - self.baseline

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta"] = self.delta
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteResult":
        d = {k: v for k, v in d.items() if k != "delta"}
        d["worst"] = [Case(**c) for c in d.get("worst", [])]
        return cls(**d)


# A "run" is a plain dict, the unit stored in the registry and rendered into a report:
#
# {
#   "kind": "eval" | "gate" | "bench",
#   "created": "2026-11-27T02:00:00Z", "lowbit_version": "0.1.0", "quick": bool, "seconds": float,
#   "baseline":  {"name", "kind", "path", "sha256", "weight_bytes"},
#   "candidate": {"name", "kind", "path", "sha256", "weight_bytes", "recipe": str | None},
#   "divergence": {                      # present for eval/gate
#       "tokens", "samples", "ppl_baseline", "ppl_candidate", "mean_kld", "p99_kld", "max_kld", "top1",
#       "kld_hist": {"edges": [...], "counts": [...]},      # per-token KLD histogram (log-spaced edges)
#       "per_sample": [{"id", "text", "kld", "top1", "ppl_baseline", "ppl_candidate"}],
#       "worst": [Case as dict, ...]},
#   "suites": [SuiteResult.to_dict(), ...],
#   "gate": {"passed": bool, "spec": str, "criteria": [{"name", "value", "op", "threshold", "passed", "detail"}]},
#   "bench": {"config": {...},
#             "baseline":  {"weight_bytes", "peak_rss_bytes", "prefill_tok_s", "decode_tok_s",
#                           "ttft_ms": {"p50", "p95", "p99"}, "latency_ms": {"p50", "p95", "p99"},
#                           "latencies_ms": [...]},
#             "candidate": {... same ...},
#             "ratios": {"decode_tok_s", "prefill_tok_s", "p95_latency", "weight_bytes", "peak_rss"}},
# }
