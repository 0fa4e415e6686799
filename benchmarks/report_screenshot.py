"""Render a report in real headless Chromium and check the screenshot is not blank.

    .venv/bin/python benchmarks/report_screenshot.py [--run-json FILE] [--out DIR] [--chromium PATH]

Without --run-json it builds a realistic synthetic gate run (divergence, four suites, bench numbers),
so the page shows every section and plot. Writes report.html, report.md and report.png into --out
(a new temp folder by default), prints their paths and the PNG's pixel statistics, and exits 1 when
the screenshot is blank. Needs /usr/bin/chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowbit.report.html import CHROMIUM, is_blank, png_stats, screenshot, write_report  # noqa: E402


def _kld_hist(rng: np.random.Generator, n_tokens: int) -> tuple[dict, np.ndarray]:
    # Per-token KLD of a good 4-bit quant is roughly log-normal: most tokens near 1e-3, a thin tail past 1.
    kld = rng.lognormal(mean=np.log(4e-3), sigma=1.3, size=n_tokens)
    edges = np.logspace(-6, 1.5, 61)
    counts, _ = np.histogram(np.clip(kld, edges[0], edges[-1]), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}, kld


def _case(i: int, text: str, base, cand, score: float) -> dict:
    return {"id": f"s{i:04d}", "text": text, "baseline": base, "candidate": cand, "score": round(score, 4)}


def _suite(name, metric, base, cand, hib, n, metrics, worst, notes=""):
    return {"name": name, "metric": metric, "baseline": base, "candidate": cand, "higher_is_better": hib, "n": n,
            "metrics": metrics, "worst": worst, "notes": notes, "delta": cand - base}


def _bench_side(rng: np.random.Generator, weight_bytes: int, rss: int, decode: float, prefill: float,
                lat_mu: float) -> dict:
    lat = rng.lognormal(np.log(lat_mu), 0.12, size=200)
    ttft = rng.lognormal(np.log(lat_mu / 8), 0.2, size=200)
    pct = lambda a: {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}  # noqa: E731
    return {"weight_bytes": weight_bytes, "peak_rss_bytes": rss, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "ttft_ms": pct(ttft), "latency_ms": pct(lat), "latencies_ms": [round(float(v), 2) for v in lat]}


def synthetic_run(seed: int = 0) -> dict:
    """A gate run shaped like what `lowbit gate` records for SmolLM2-135M quantized to w4-g128."""
    rng = np.random.default_rng(seed)
    hist, kld = _kld_hist(rng, 32768)
    texts = ["The mitochondrion is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
             "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
             "In 1648 the Peace of Westphalia ended the Thirty Years' War and reshaped the map of Europe.",
             "Le chat dort sur le canapé pendant que la pluie tombe doucement contre la fenêtre.",
             "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10 ORDER BY 2 DESC;"]
    per_sample = [{"id": f"s{i:04d}", "text": texts[i % len(texts)], "kld": float(rng.lognormal(np.log(0.01), 0.6)),
                   "top1": float(rng.uniform(0.9, 0.99)), "ppl_baseline": float(rng.uniform(8, 20)),
                   "ppl_candidate": float(rng.uniform(8.2, 21))} for i in range(64)]
    worst = [_case(i, texts[i % len(texts)], f"token '{w}'", f"token '{v}'", float(s)) for i, (w, v, s) in
             enumerate([("ATP", "energy", 2.41), ("fibonacci", "fib", 1.87), ("Westphalia", "West", 1.52),
                        ("canapé", "lit", 1.33), ("HAVING", "WHERE", 1.12)])]
    base_bytes, cand_bytes = 269_060_096, 81_250_304
    base = _bench_side(rng, base_bytes, 1_480_000_000, 41.2, 812.0, 390.0)
    cand = _bench_side(rng, cand_bytes, 690_000_000, 37.9, 701.0, 418.0)
    suites = [
        _suite("general", "ppl", 13.42, 13.97, False, 256,
               {"ppl": {"baseline": 13.42, "candidate": 13.97}, "bits_per_byte": {"baseline": 0.912, "candidate": 0.925}},
               []),
        _suite("jargon", "ppl", 28.1, 30.4, False, 128, {"ppl": {"baseline": 28.1, "candidate": 30.4}},
               [_case(i, t, s, s * 1.3, s * 0.3) for i, (t, s) in
                enumerate([("pharmacokinetics of <b>monoclonal</b> antibodies", 41.0),
                           ("quantum chromodynamics lattice gauge", 37.5)])]),
        _suite("long_context", "needle_acc_pct", 92.0, 89.0, True, 50,
               {"needle_acc_pct": {"baseline": 92.0, "candidate": 89.0}}, [], "contexts of 2k-8k tokens"),
        _suite("tool_calling", "json_valid_pct", 96.0, 96.5, True, 200,
               {"json_valid_pct": {"baseline": 96.0, "candidate": 96.5}, "exact_args_pct": {"baseline": 81.0, "candidate": 78.5}},
               [_case(1, "Book a table for 4 at 7pm <script>alert(1)</script>", '{"party": 4, "time": "19:00"}',
                      '{"party": 4, "time": "7pm"', 1.0)]),
    ]
    p95_ratio = cand["latency_ms"]["p95"] / base["latency_ms"]["p95"]
    criteria = [
        {"name": "mean_kld", "value": float(kld.mean()), "op": "<=", "threshold": 0.02, "passed": bool(kld.mean() <= 0.02), "detail": "over 32,768 tokens"},
        {"name": "ppl_change_pct", "value": 4.1, "op": "<=", "threshold": 3.0, "passed": False, "detail": "general suite"},
        {"name": "top1", "value": 0.953, "op": ">=", "threshold": 0.9, "passed": True, "detail": ""},
        {"name": "json_valid_pct_drop", "value": -0.5, "op": "<=", "threshold": 1.0, "passed": True, "detail": "tool_calling"},
        {"name": "p95_latency_ratio", "value": round(p95_ratio, 3), "op": "<=", "threshold": 1.25, "passed": p95_ratio <= 1.25, "detail": ""},
    ]
    return {
        "kind": "gate", "created": "2026-11-27T02:00:00Z", "lowbit_version": "0.1.0", "quick": False, "seconds": 412.7,
        "baseline": {"name": "smollm2-135m", "kind": "gguf", "path": "/models/SmolLM2-135M-Instruct-f16.gguf",
                     "sha256": "3f1c0a9e4b7d2c8e" + "0" * 48, "weight_bytes": base_bytes},
        "candidate": {"name": "smollm2-135m-w4-g128", "kind": "lowbit", "path": "out/smollm2-w4",
                      "sha256": "a9b8c7d6e5f40312" + "1" * 48, "weight_bytes": cand_bytes, "recipe": "w4-g128"},
        "divergence": {"tokens": int(kld.size), "samples": len(per_sample), "ppl_baseline": 13.42, "ppl_candidate": 13.97,
                       "mean_kld": float(kld.mean()), "p99_kld": float(np.percentile(kld, 99)), "max_kld": float(kld.max()),
                       "top1": 0.953, "kld_hist": hist, "per_sample": per_sample, "worst": worst},
        "suites": suites,
        "gate": {"passed": all(c["passed"] for c in criteria), "spec": "default", "criteria": criteria},
        "bench": {"config": {"device": "cpu", "threads": 2, "prompt_tokens": 128, "new_tokens": 64, "requests": 200},
                  "baseline": base, "candidate": cand,
                  "ratios": {"decode_tok_s": cand["decode_tok_s"] / base["decode_tok_s"],
                             "prefill_tok_s": cand["prefill_tok_s"] / base["prefill_tok_s"], "p95_latency": p95_ratio,
                             "weight_bytes": cand_bytes / base_bytes, "peak_rss": cand["peak_rss_bytes"] / base["peak_rss_bytes"]}},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-json", type=Path, help="a run dict as JSON (default: a synthetic gate run)")
    ap.add_argument("--out", type=Path, help="folder for report.html/.md/.png (default: a new temp folder)")
    ap.add_argument("--chromium", default=CHROMIUM)
    args = ap.parse_args()
    run = json.loads(args.run_json.read_text()) if args.run_json else synthetic_run()
    out = args.out or Path(tempfile.mkdtemp(prefix="lowbit-report-"))
    html_path, md_path = write_report(run, out)
    png = screenshot(html_path, out / "report.png", chromium=args.chromium)
    stats = png_stats(png)
    print(f"html: {html_path}\nmd:   {md_path}\npng:  {png}")
    print(f"{stats['width']}x{stats['height']} px, variance {stats['variance']:.4f}, "
          f"{stats['colors']} colours, {stats['white'] * 100:.1f}% white")
    if is_blank(stats):
        print("FAIL: the screenshot is blank", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
