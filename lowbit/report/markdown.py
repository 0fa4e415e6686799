"""The report's content as tables, and its Markdown rendering (a summary to paste into a PR).

`sections(run)` turns a run dict (see lowbit/eval/types.py) into titled tables of plain strings. The
Markdown and the HTML report both render these same tables, so the two always say the same thing;
the HTML adds the plots. Every section is optional: it appears only when its key is in the run, so
eval, gate and bench runs all render.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

MAX_TEXT = 160  # characters of sample text shown in a worst-case table
MAX_VALUE = 80  # characters of a model output shown in a cell
MAX_WORST = 10  # rows per worst-case table
BENCH_NOISE = 0.01  # timing ratios within 1% of 1.0 are run-to-run noise, not better or worse


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    align: str = ""  # one letter per column, "l" or "r"; missing letters mean "l"
    tones: list[str | None] = field(default_factory=list)  # per row: "good", "bad" or None
    tone_col: int = -1  # the column a row's tone colors
    note: str = ""
    cards: bool = False  # the HTML may show it as stat tiles (rows are label, value, note)


@dataclass
class Section:
    key: str  # the run key it comes from; the HTML uses it as the section id
    title: str
    tables: list[Table]


# ---- formatting -------------------------------------------------------------------------------


def is_num(x: Any) -> bool:
    """Real numbers, numpy scalars included (they reach run dicts); bools are not numbers here."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def fmt(x: Any) -> str:
    """One cell: numbers to 4 significant digits, missing values as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral):
        return f"{int(x):,}"
    if is_num(x):
        x = float(x)
        if not math.isfinite(x):
            return str(x)
        return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}"
    if isinstance(x, str):
        return shorten(x, MAX_VALUE)
    return shorten(json.dumps(x, default=str), MAX_VALUE)


def shorten(text: str, limit: int) -> str:
    """Whitespace collapsed to single spaces (tables are one line per row), then cut with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_bytes(n: Any) -> str:
    if not is_num(n):
        return fmt(n)
    for unit in ("B", "KB", "MB", "GB"):  # decimal units, as the CLI prints them
        if abs(n) < 1000 or unit == "GB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:+.2f}%"


def fmt_top1(x: Any) -> str:
    """Top-1 agreement is stored as a fraction; a value above 1 is taken as already in percent."""
    if not is_num(x):
        return fmt(x)
    return f"{x * 100 if x <= 1 else x:.2f}%"


def rel_change(base: Any, cand: Any) -> float | None:
    """Candidate vs baseline in percent; None when either is missing or the baseline is 0."""
    if not (is_num(base) and is_num(cand)) or base == 0:
        return None
    return float((cand - base) / abs(base) * 100)


def tone(change: float | None, higher_is_better: bool, noise: float = 0.0) -> str | None:
    if change is None or abs(change) <= noise:
        return None
    return "good" if (change > 0) == higher_is_better else "bad"


# ---- sections ---------------------------------------------------------------------------------


def identity_table(run: dict) -> Table:
    base, cand = run.get("baseline") or {}, run.get("candidate") or {}
    fields = [("Name", "name", fmt), ("Kind", "kind", fmt), ("Path", "path", fmt),
              ("SHA-256", "sha256", lambda s: fmt(s)[:12] if s else "—"),
              ("Weights", "weight_bytes", fmt_bytes), ("Recipe", "recipe", fmt)]
    rows = [[label, conv(base.get(key)), conv(cand.get(key))]
            for label, key, conv in fields if key in base or key in cand]
    return Table("Models", ["", "Baseline", "Candidate"], rows)


def run_table(run: dict) -> Table | None:
    fields = [("Kind", "kind"), ("Created", "created"), ("lowbit", "lowbit_version"), ("Quick", "quick")]
    rows = [[label, fmt(run[key])] for label, key in fields if key in run]
    if "seconds" in run:
        rows.append(["Duration", f"{run['seconds']:.1f} s"])
    return Table("Run", ["", "Value"], rows) if rows else None


def gate_table(gate: dict) -> Table:
    rows, tones = [], []
    for c in gate.get("criteria", []):
        ok = c.get("passed")
        rows.append([fmt(c.get("name")), fmt(c.get("value")), fmt(c.get("op")), fmt(c.get("threshold")),
                     "n/a" if ok is None else "PASS" if ok else "FAIL", fmt(c.get("detail") or "")])
        tones.append(None if ok is None else "good" if ok else "bad")
    return Table("Criteria", ["Criterion", "Value", "Op", "Threshold", "Result", "Detail"], rows,
                 align="lrcrll", tones=tones, tone_col=4, note=f"spec: {gate['spec']}" if gate.get("spec") else "")


def verdict(gate: dict) -> str:
    crit = gate.get("criteria", [])
    n_ok = sum(bool(c.get("passed")) for c in crit)
    n_na = sum(c.get("passed") is None for c in crit)
    word = "PASS" if gate.get("passed") else "FAIL"
    return (f"{word}: {n_ok} of {len(crit) - n_na} criteria passed" + (f" ({n_na} not applicable)" if n_na else "")
            if crit else word)


def divergence_table(div: dict) -> Table:
    change = rel_change(div.get("ppl_baseline"), div.get("ppl_candidate"))
    rows = [["Perplexity (baseline)", fmt(div.get("ppl_baseline")), ""],
            ["Perplexity (candidate)", fmt(div.get("ppl_candidate")), fmt_pct(change)],
            ["Mean KLD", fmt(div.get("mean_kld")), ""],
            ["p99 KLD", fmt(div.get("p99_kld")), ""],
            ["Max KLD", fmt(div.get("max_kld")), ""],
            ["Top-1 agreement", fmt_top1(div.get("top1")), ""],
            ["Tokens", fmt(div.get("tokens")), ""],
            ["Samples", fmt(div.get("samples")), ""]]
    tones = [None, tone(change, higher_is_better=False)] + [None] * 6
    return Table("Divergence", ["Metric", "Value", "vs baseline"], rows, align="lrr", tones=tones,
                 tone_col=2, cards=True)


def suites_table(suites: list[dict]) -> Table:
    with_notes = any(s.get("notes") for s in suites)
    rows, tones = [], []
    for s in suites:
        change = rel_change(s.get("baseline"), s.get("candidate"))
        t = tone(change if change is not None else _delta(s), s.get("higher_is_better", True))
        rows.append([fmt(s.get("name")), fmt(s.get("metric")), fmt(s.get("baseline")), fmt(s.get("candidate")),
                     fmt(_delta(s)), fmt_pct(change), {"good": "better", "bad": "worse", None: "same"}[t],
                     fmt(s.get("n"))] + ([shorten(s.get("notes") or "", MAX_TEXT)] if with_notes else []))
        tones.append(t)
    headers = ["Suite", "Metric", "Baseline", "Candidate", "Δ", "Change", "Verdict", "n"]
    return Table("Suites", headers + (["Notes"] if with_notes else []), rows, align="llrrrrlrl", tones=tones,
                 tone_col=6)


def _delta(s: dict) -> float | None:
    d = s.get("delta")
    if d is None and is_num(s.get("baseline")) and is_num(s.get("candidate")):
        d = s["candidate"] - s["baseline"]
    return d


def suite_metrics_table(suites: list[dict]) -> Table | None:
    rows = [[fmt(s.get("name")), fmt(m), fmt(v.get("baseline")), fmt(v.get("candidate")),
             fmt_pct(rel_change(v.get("baseline"), v.get("candidate")))]
            for s in suites for m, v in (s.get("metrics") or {}).items() if isinstance(v, dict)]
    if not rows:
        return None
    return Table("All suite metrics", ["Suite", "Metric", "Baseline", "Candidate", "Change"], rows, align="llrrr")


# (label, key in each side's stats, higher is better, key in bench["ratios"])
BENCH_METRICS = [
    ("Weights", "weight_bytes", False, "weight_bytes"),
    ("Peak RSS", "peak_rss_bytes", False, "peak_rss"),
    ("Prefill tok/s", "prefill_tok_s", True, "prefill_tok_s"),
    ("Decode tok/s", "decode_tok_s", True, "decode_tok_s"),
    ("TTFT p50 (ms)", ("ttft_ms", "p50"), False, None),
    ("TTFT p95 (ms)", ("ttft_ms", "p95"), False, None),
    ("TTFT p99 (ms)", ("ttft_ms", "p99"), False, None),
    ("Latency p50 (ms)", ("latency_ms", "p50"), False, None),
    ("Latency p95 (ms)", ("latency_ms", "p95"), False, "p95_latency"),
    ("Latency p99 (ms)", ("latency_ms", "p99"), False, None),
]


def _stat(side: dict, key: str | tuple[str, str]) -> Any:
    if isinstance(key, tuple):
        return (side.get(key[0]) or {}).get(key[1])
    return side.get(key)


def bench_table(bench: dict) -> Table:
    base, cand, ratios = bench.get("baseline") or {}, bench.get("candidate") or {}, bench.get("ratios") or {}
    rows, tones = [], []
    for label, key, higher, ratio_key in BENCH_METRICS:
        b, c = _stat(base, key), _stat(cand, key)
        if b is None and c is None:
            continue
        ratio = ratios.get(ratio_key) if ratio_key else None
        if ratio is None and rel_change(b, c) is not None:
            ratio = c / b
        conv = fmt_bytes if str(key).endswith("bytes") else fmt
        rows.append([label, conv(b), conv(c), f"{ratio:.3f}×" if ratio is not None else "—"])
        tones.append(tone(None if ratio is None else ratio - 1, higher, noise=BENCH_NOISE))
    return Table("Speed and memory", ["Metric", "Baseline", "Candidate", "Ratio (cand/base)"], rows,
                 align="lrrr", tones=tones, tone_col=3)


def bench_config_table(bench: dict) -> Table | None:
    cfg = bench.get("config") or {}
    rows = [[str(k), fmt(v)] for k, v in cfg.items()]
    return Table("Benchmark settings", ["Setting", "Value"], rows) if rows else None


def cases_table(title: str, cases: list[dict]) -> Table:
    rows = [[str(i), fmt(c.get("id")), shorten(c.get("text", ""), MAX_TEXT), fmt(c.get("baseline")),
             fmt(c.get("candidate")), fmt(c.get("score"))] for i, c in enumerate(cases[:MAX_WORST], 1)]
    return Table(title, ["#", "ID", "Text", "Baseline", "Candidate", "Score"], rows, align="rllllr",
                 note=_shown(len(cases)))


def per_sample_table(samples: list[dict]) -> Table:
    """Worst samples by KLD, for runs that carry per-sample numbers but no worst list."""
    worst = sorted(samples, key=lambda s: s.get("kld") or 0.0, reverse=True)
    rows = [[str(i), fmt(s.get("id")), shorten(s.get("text", ""), MAX_TEXT), fmt(s.get("kld")),
             fmt_top1(s.get("top1")), fmt(s.get("ppl_baseline")), fmt(s.get("ppl_candidate"))]
            for i, s in enumerate(worst[:MAX_WORST], 1)]
    return Table("Divergence: samples with the highest KLD", ["#", "ID", "Text", "KLD", "Top-1", "PPL base",
                 "PPL cand"], rows, align="rllrrrr", note=_shown(len(samples)))


def _shown(n: int) -> str:
    return f"showing {MAX_WORST} of {n}" if n > MAX_WORST else ""


def worst_tables(run: dict) -> list[Table]:
    div = run.get("divergence") or {}
    tables = []
    if div.get("worst"):
        tables.append(cases_table("Divergence: worst samples", div["worst"]))
    elif div.get("per_sample"):
        tables.append(per_sample_table(div["per_sample"]))
    for s in run.get("suites") or []:
        if s.get("worst"):
            tables.append(cases_table(f"Suite {s.get('name')}: worst cases ({s.get('metric')})", s["worst"]))
    return tables


def sections(run: dict) -> list[Section]:
    """The report's sections in display order; only those whose data is in the run."""
    out = [Section("identity", "Models", [t for t in (identity_table(run), run_table(run)) if t and t.rows])]
    if run.get("gate"):
        out.append(Section("gate", "Gate", [gate_table(run["gate"])]))
    if run.get("divergence"):
        out.append(Section("divergence", "Divergence from the baseline", [divergence_table(run["divergence"])]))
    if run.get("suites"):
        tables = [suites_table(run["suites"]), suite_metrics_table(run["suites"])]
        out.append(Section("suites", "Evaluation suites", [t for t in tables if t]))
    if run.get("bench"):
        tables = [bench_table(run["bench"]), bench_config_table(run["bench"])]
        out.append(Section("bench", "Speed and memory", [t for t in tables if t]))
    if worst := worst_tables(run):
        out.append(Section("worst", "Worst cases", worst))
    return out


def title(run: dict) -> str:
    kind = run.get("kind")
    base, cand = (run.get("baseline") or {}).get("name"), (run.get("candidate") or {}).get("name")
    head = f"lowbit {kind} report" if kind else "lowbit report"
    return f"{head}: {cand} vs {base}" if base or cand else head


# ---- Markdown ---------------------------------------------------------------------------------


def md_cell(text: str) -> str:
    """Pipes would split the cell and raw '<' could become HTML where the Markdown is rendered."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def md_table(t: Table) -> str:
    align = {"l": ":---", "r": "---:", "c": ":---:"}
    marks = [align.get(t.align[i] if i < len(t.align) else "l", ":---") for i in range(len(t.headers))]
    lines = ["| " + " | ".join(md_cell(h) or " " for h in t.headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(run: dict) -> str:
    parts = [f"# {md_cell(title(run))}"]
    if run.get("gate"):
        ok = run["gate"].get("passed")
        parts.append(f"**Gate: {'✅' if ok else '❌'} {md_cell(verdict(run['gate']))}**")
    for sec in sections(run):
        parts.append(f"## {sec.title}")
        for t in sec.tables:
            if len(sec.tables) > 1 and t.title != sec.title:  # else the section heading names it
                parts.append(f"### {md_cell(t.title)}")
            parts.append(md_table(t) if t.rows else "_none_")
            if t.note:
                parts.append(f"_{md_cell(t.note)}_")
    return "\n\n".join(parts) + "\n"
