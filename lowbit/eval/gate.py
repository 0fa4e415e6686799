"""Success criteria as a YAML spec, turned into pass/fail gates.

    quality:
      max_ppl_increase_pct: 1.5      # general text (Wikipedia) perplexity, candidate vs baseline
      max_mean_kld: 0.02             # mean per-token KL(baseline || candidate)
      max_p99_kld: 0.3               # tail: 99th percentile of per-token KLD
      max_sample_kld: 0.05           # tail: the worst sample's mean KLD
      min_top1_agreement: 0.9
      suites:
        jargon: {max_acc_drop: 2.0, max_kld: 0.05}
        long_context: {max_ppl_increase_pct: 3.0, max_needle_drop: 0}
        json: {min_valid_pct: 98, max_valid_drop: 5, min_schema_valid_pct: 90, min_agreement_pct: 80}
        structured: {max_kld: 0.05, max_top1_loss_pct: 3, max_nll_increase: 0.1}
        json_tasks: {min_valid_pct: 80, max_valid_drop: 10, max_correct_drop: 10}
        user: {file: my_evals.jsonl, min_pass_pct: 90, max_pass_drop: 5}
    latency: {p95_improvement_pct: 20, min_decode_speedup: 1.5}
    memory: {reduction_pct: 50, rss_reduction_pct: 40}   # weight bytes; resident memory of a fresh process
    eval: {samples: 16, seq_len: 256}              # optional: how much text the quality part reads
    bench: {prompt_tokens: 128, output_tokens: 32, requests: 12, batch_size: 1, concurrency: 1}

Drops are in percentage points (baseline minus candidate); *_pct increases are relative.

Allowed values (checked when the spec is parsed, before any model loads; see RANGES and INT_RANGES):
KLD maxima and *_increase_pct >= 0; min_top1_agreement 0..1; pass, valid, agreement and needle
percentages and drops 0..100; latency p95_improvement_pct and memory reduction_pct -1000..100;
min_decode_speedup above 0, at most 1000. eval and bench fields are integers: samples 1..4096,
seq_len 16..131072, context 128..1048576; prompt_tokens 1..131072, output_tokens 1..65536, requests
1..100000, batch_size 1..1024, concurrency 1..256, warmup 0..10000.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lowbit.datafile import read_data_file
from lowbit.errors import LowbitError

QUALITY_KEYS = {"max_ppl_increase_pct", "max_mean_kld", "max_p99_kld", "max_sample_kld", "min_top1_agreement"}
SUITE_KEYS = {
    "jargon": {"max_acc_drop", "max_kld"},
    "long_context": {"max_ppl_increase_pct", "max_needle_drop", "min_needle_pct"},
    "json": {"min_valid_pct", "max_valid_drop", "min_schema_valid_pct", "min_agreement_pct"},
    "structured": {"file", "max_kld", "max_top1_loss_pct", "max_nll_increase"},
    "json_tasks": {"min_valid_pct", "max_valid_drop", "max_correct_drop"},
    "user": {"file", "min_pass_pct", "max_pass_drop"},
}
SECTION_KEYS = {
    "quality": QUALITY_KEYS | {"suites"},
    "latency": {"p95_improvement_pct", "min_decode_speedup"},
    "memory": {"reduction_pct", "rss_reduction_pct"},
    "eval": {"samples", "seq_len", "context"},
    "bench": {"prompt_tokens", "output_tokens", "requests", "batch_size", "concurrency", "warmup"},
}

# (low, high, low inclusive) for every numeric criterion, by field; high is inclusive, None: unbounded.
_PCT, _DROP, _NONNEG = (0, 100, True), (0, 100, True), (0, None, True)
RANGES = {
    "quality": {"max_ppl_increase_pct": _NONNEG, "max_mean_kld": _NONNEG, "max_p99_kld": _NONNEG,
                "max_sample_kld": _NONNEG, "min_top1_agreement": (0, 1, True)},
    "quality.suites.jargon": {"max_acc_drop": _DROP, "max_kld": _NONNEG},
    "quality.suites.long_context": {"max_ppl_increase_pct": _NONNEG, "max_needle_drop": _DROP, "min_needle_pct": _PCT},
    "quality.suites.json": {"min_valid_pct": _PCT, "max_valid_drop": _DROP, "min_schema_valid_pct": _PCT,
                            "min_agreement_pct": _PCT},
    "quality.suites.structured": {"max_kld": _NONNEG, "max_top1_loss_pct": _PCT, "max_nll_increase": _NONNEG},
    "quality.suites.json_tasks": {"min_valid_pct": _PCT, "max_valid_drop": _DROP, "max_correct_drop": _DROP},
    "quality.suites.user": {"min_pass_pct": _PCT, "max_pass_drop": _DROP},
    "latency": {"p95_improvement_pct": (-1000, 100, True), "min_decode_speedup": (0, 1000, False)},
    "memory": {"reduction_pct": (-1000, 100, True), "rss_reduction_pct": (-1000, 100, True)},
}
# (low, high) of the integer fields: how much text the quality part reads, and the bench load.
INT_RANGES = {
    "eval": {"samples": (1, 4096), "seq_len": (16, 131_072), "context": (128, 1_048_576)},
    "bench": {"prompt_tokens": (1, 131_072), "output_tokens": (1, 65_536), "requests": (1, 100_000),
              "batch_size": (1, 1024), "concurrency": (1, 256), "warmup": (0, 10_000)},
}
MAX_FILE_CHARS = 4096  # the user suite's path

DEFAULT_SPEC = """\
# lowbit's default gate: close to the FP32 model on text, its tails, rare terms, long context and
# JSON structure; no slower than the baseline; at least half the weight memory and a tenth of the
# process's memory. docs/gate.md says where each threshold comes from (benchmarks/gate_guard.py).
quality:
  max_ppl_increase_pct: 2.0
  max_mean_kld: 0.02
  max_p99_kld: 0.25
  max_sample_kld: 0.05
  min_top1_agreement: 0.9
  suites:
    jargon: {max_acc_drop: 2.0}
    long_context: {max_ppl_increase_pct: 3.0, max_needle_drop: 0}
    json: {max_valid_drop: 10}
    structured: {max_kld: 0.02, max_top1_loss_pct: 3.0, max_nll_increase: 0.05}
    json_tasks: {max_valid_drop: 13, max_correct_drop: 13}
latency: {p95_improvement_pct: 0, min_decode_speedup: 1.0}
memory: {reduction_pct: 50, rss_reduction_pct: 10}
"""


@dataclass(frozen=True)
class Spec:
    data: dict
    source: str

    def section(self, name: str) -> dict:
        return self.data.get(name) or {}

    @property
    def suites(self) -> dict[str, dict]:
        return self.section("quality").get("suites") or {}


def _check_fields(source: str, where: str, body: Any, known: set[str], free: tuple[str, ...] = ()) -> None:
    """Every field of `body` is known and numeric (except the `free` ones, checked by the caller)."""
    if not isinstance(body, dict):
        raise LowbitError(f"spec {source}: '{where}' must be a mapping of criteria")
    for key, val in body.items():
        if key not in known:
            raise LowbitError(f"spec {source}: field '{where}.{key}' is unknown; known: {', '.join(sorted(known))}")
        if key in free:
            continue
        field = f"spec {source}: field '{where}.{key}'"
        if where in INT_RANGES:
            lo, hi = INT_RANGES[where][key]
            if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
                raise LowbitError(f"{field} is {val!r}; fix: give a whole number from {lo:,} to {hi:,}")
            continue
        if not _is_number(val):
            hint = ""
            if isinstance(val, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", val.strip()):
                hint = f" (YAML reads {val} as text: write it with a decimal point, e.g. {float(val):.1e})"
            raise LowbitError(f"{field} must be a number, got {val!r}{hint}")
        lo, hi, lo_inclusive = RANGES[where][key]
        if not math.isfinite(val) or (val < lo if lo_inclusive else val <= lo) or (hi is not None and val > hi):
            allowed = (f"from {lo:g} to {hi:g}" if lo_inclusive else f"above {lo:g} and at most {hi:g}") if hi is not None \
                else f"{lo:g} or more"
            raise LowbitError(f"{field} is {val!r}, out of range; fix: give a number {allowed}")


def parse_spec(data: Any, source: str) -> Spec:
    if not isinstance(data, dict) or not data:
        raise LowbitError(f"spec {source}: expected a mapping with sections {', '.join(SECTION_KEYS)}")
    for sec, body in data.items():
        if sec not in SECTION_KEYS:
            raise LowbitError(f"spec {source}: unknown section '{sec}'; sections are {', '.join(SECTION_KEYS)}")
        _check_fields(source, sec, body, SECTION_KEYS[sec], free=("suites",))
    suites = (data.get("quality") or {}).get("suites") or {}
    if not isinstance(suites, dict):
        raise LowbitError(f"spec {source}: field 'quality.suites' must map suite names ({', '.join(SUITE_KEYS)}) to criteria")
    for name, crit in suites.items():
        if name not in SUITE_KEYS:
            raise LowbitError(f"spec {source}: suite 'quality.suites.{name}' is unknown; suites are {', '.join(SUITE_KEYS)}")
        _check_fields(source, f"quality.suites.{name}", crit, SUITE_KEYS[name], free=("file",))
        if name == "structured" and "file" in crit and (not isinstance(crit["file"], str) or not crit["file"].strip()
                                                        or len(crit["file"]) > MAX_FILE_CHARS or "\0" in crit["file"]):
            raise LowbitError(f"spec {source}: field 'quality.suites.structured.file' is not a usable path; fix: the "
                              f"path of a JSONL file of prompts and JSON answers")
        if name == "user" and (not isinstance(crit.get("file"), str) or not crit["file"].strip()):
            raise LowbitError(f"spec {source}: 'quality.suites.user' needs a 'file' (the path of a JSONL of prompts)")
        if name == "user" and (len(crit["file"]) > MAX_FILE_CHARS or "\0" in crit["file"]):
            raise LowbitError(f"spec {source}: field 'quality.suites.user.file' is not a usable path (over "
                              f"{MAX_FILE_CHARS} characters, or a NUL byte); fix: give the JSONL file's path")
    return Spec(data, source)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_spec(arg: str) -> Spec:
    """'default', or the path of a YAML spec. A relative user-suite file is resolved next to the spec."""
    if arg == "default":
        return parse_spec(yaml.safe_load(DEFAULT_SPEC), "default")
    p = Path(arg)
    data = read_data_file(p, "spec file", "pass a YAML spec, or 'default'")
    spec = parse_spec(data, f"file {p}")
    for name in ("user", "structured"):
        crit = spec.suites.get(name)
        if crit and crit.get("file") and not Path(crit["file"]).is_absolute():
            crit["file"] = str((p.parent / crit["file"]).resolve())
    return spec


# -- evaluation -----------------------------------------------------------------------------------
def _row(name: str, value: float | None, op: str, threshold: float, detail: str = "") -> dict:
    if value is None:
        return {"name": name, "value": None, "op": op, "threshold": threshold, "passed": False,
                "detail": detail or "not measured"}
    passed = value <= threshold if op == "<=" else value >= threshold
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": bool(passed), "detail": detail}


def _pct_increase(base: float, cand: float) -> float:
    return 100 * (cand / base - 1) if base else float("inf")


def evaluate(spec: Spec, run: dict) -> dict:
    """The run dict's "gate" entry: one row per criterion, and passed only if every row passed."""
    rows = []
    q = spec.section("quality")
    div = run.get("divergence") or {}
    checks = {
        "max_ppl_increase_pct": ("general ppl increase %", lambda: _pct_increase(div["ppl_baseline"], div["ppl_candidate"]), "<="),
        "max_mean_kld": ("mean KLD", lambda: div["mean_kld"], "<="),
        "max_p99_kld": ("p99 token KLD", lambda: div["p99_kld"], "<="),
        "max_sample_kld": ("worst sample mean KLD", lambda: div["max_sample_kld"], "<="),
        "min_top1_agreement": ("top-1 agreement", lambda: div["top1"], ">="),
    }
    for key, (label, get, op) in checks.items():
        if key in q:
            rows.append(_row(label, get() if div else None, op, q[key]))
    suites = {s["name"].split(":")[0]: s for s in run.get("suites", [])}
    for name, crit in spec.suites.items():
        s = suites.get({"json": "tool_calling"}.get(name, name))
        rows += _suite_rows(name, crit, s)
    bench = run.get("bench")
    lat = spec.section("latency")
    why = f"the latency benchmark could not run: {run['bench_error']}" if run.get("bench_error") else ""
    if "p95_improvement_pct" in lat:
        detail = why or (f"p95 {bench['baseline']['latency_ms']['p95']:.0f} ms -> {bench['candidate']['latency_ms']['p95']:.0f} ms"
                         if bench else "")
        rows.append(_row("p95 latency improvement %", bench["ratios"]["p95_improvement_pct"] if bench else None, ">=",
                         lat["p95_improvement_pct"], detail))
    if "min_decode_speedup" in lat:
        detail = why or (f"{bench['baseline']['decode_tok_s']:.1f} -> {bench['candidate']['decode_tok_s']:.1f} tokens/s"
                         if bench and bench["baseline"]["decode_tok_s"] and bench["candidate"]["decode_tok_s"] else "")
        rows.append(_row("decode tokens/s speedup", bench["ratios"]["decode_tok_s"] if bench else None, ">=",
                         lat["min_decode_speedup"], detail))
    mem = spec.section("memory")
    if "reduction_pct" in mem:
        b, c = run["baseline"].get("weight_bytes"), run["candidate"].get("weight_bytes")
        rows.append(_row("weight memory reduction %", 100 * (1 - c / b) if b and c else None, ">=", mem["reduction_pct"],
                         f"{b / 1e6:.1f} MB -> {c / 1e6:.1f} MB" if b and c else ""))
    if "rss_reduction_pct" in mem:
        pm = run.get("process_memory") or {}
        b, c = (pm.get("baseline") or {}).get("rss_bytes"), (pm.get("candidate") or {}).get("rss_bytes")
        detail = (f"the memory measurement could not run: {run['process_memory_error']}" if run.get("process_memory_error")
                  else f"{b / 1e6:.0f} MB -> {c / 1e6:.0f} MB resident after loading and one request, each in a "
                       f"fresh process" if b and c else "")
        rows.append(_row("process memory reduction %", 100 * (1 - c / b) if b and c else None, ">=",
                         mem["rss_reduction_pct"], detail))
    # a row that does not apply (passed None, a suite that cannot judge this pair) neither passes nor fails
    judged = [r for r in rows if r["passed"] is not None]
    return {"passed": bool(judged) and all(r["passed"] for r in judged), "spec": spec.source, "criteria": rows}


def _metric(s: dict, key: str, who: str) -> float | None:
    m = s["metrics"].get(key)
    return None if m is None else m[who]


def _suite_rows(name: str, crit: dict, s: dict | None) -> list[dict]:
    rows = []

    def get(key: str, who: str = "candidate") -> float | None:
        return None if s is None else _metric(s, key, who)

    def drop(key: str) -> float | None:
        b, c = get(key, "baseline"), get(key)
        return None if b is None or c is None else b - c

    for key, val in crit.items():
        if key == "file":
            continue
        if s is not None and s.get("skipped"):  # the suite cannot judge this pair: neither pass nor fail
            rows.append({"name": f"{name}: {key}", "value": None, "op": "", "threshold": val, "passed": None,
                         "detail": f"not applicable: {s['skipped']}"})
            continue
        if name == "jargon":
            row = {"max_acc_drop": ("jargon: token accuracy drop (points)", drop("jargon_acc_pct"), "<="),
                   "max_kld": ("jargon: KLD on jargon tokens", get("jargon_kld"), "<=")}[key]
        elif name == "long_context":
            last = None if s is None else s["metric"]
            inc = None if s is None else _pct_increase(s["baseline"], s["candidate"])
            row = {"max_ppl_increase_pct": (f"long context: {last or 'last bucket'} increase %", inc, "<="),
                   "max_needle_drop": ("long context: needle retrieval drop (points)", drop("needle_pct"), "<="),
                   "min_needle_pct": ("long context: needle retrieval %", get("needle_pct"), ">=")}[key]
        elif name == "json":
            row = {"min_valid_pct": ("json: valid JSON calls %", get("json_valid_pct"), ">="),
                   "max_valid_drop": ("json: valid JSON drop (points)", drop("json_valid_pct"), "<="),
                   "min_schema_valid_pct": ("json: schema-valid calls %", get("schema_valid_pct"), ">="),
                   "min_agreement_pct": ("json: calls agreeing with baseline %", get("agreement_with_baseline_pct"), ">=")}[key]
        elif name == "structured":
            inc = None if get("struct_nll") is None else get("struct_nll") - get("struct_nll", "baseline")
            row = {"max_kld": ("structured: KLD on JSON structure tokens", get("struct_kld"), "<="),
                   "max_top1_loss_pct": ("structured: structure tokens no longer top-1 %", get("struct_top1_loss_pct"),
                                         "<="),
                   "max_nll_increase": ("structured: NLL increase on structure tokens (nats)", inc, "<=")}[key]
        elif name == "json_tasks":
            row = {"min_valid_pct": ("json tasks: valid JSON %", get("valid_pct"), ">="),
                   "max_valid_drop": ("json tasks: valid JSON drop (points)", drop("valid_pct"), "<="),
                   "max_correct_drop": ("json tasks: correct answers drop (points)", drop("correct_pct"), "<=")}[key]
        else:  # user
            row = {"min_pass_pct": ("user suite: pass %", get("pass_pct"), ">="),
                   "max_pass_drop": ("user suite: pass drop (points)", drop("pass_pct"), "<=")}[key]
        rows.append(_row(row[0], row[1], row[2], val))
    return rows
