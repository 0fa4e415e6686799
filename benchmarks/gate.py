"""`lowbit gate` on the bundled model: wall time, verdicts and every suite's scores, side by side.

    .venv/bin/python benchmarks/gate.py [--model smollm2-135m] [--skip-full]

Candidates: INT8 (honest), W4 g128 (RTN), and a deliberately damaged INT8 whose
model.layers.3.mlp.down_proj is quantized to 2 bits per channel. Each runs through the real CLI in
a fresh process (`lowbit gate default BASE CAND`, with and without --quick), timed wall-clock; the
runs land in a private registry, from which the suite scores are read. One report is rendered in
headless Chromium to check it draws. Writes the "gate-<model>" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DAMAGED = """\
name: damaged-int8
scheme: {kind: int, bits: 8, granularity: channel}
overrides:
  - {match: model.layers.3.mlp.down_proj, scheme: {kind: int, bits: 2, granularity: channel}}
"""


def lowbit_cli(*args: str, env: dict) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "lowbit"), *args], capture_output=True, text=True, env=env)
    return r.returncode, time.perf_counter() - t0, r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--skip-full", action="store_true", help="Only the --quick gates.")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    from benchmarks.presets import write_section
    from lowbit.report.html import png_stats, screenshot
    from lowbit.report.registry import get_run, list_runs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "LOWBIT_HOME": str(tmp), "COLUMNS": "160"}
        (tmp / "damaged.yaml").write_text(DAMAGED)
        cands = {"int8": "int8", "w4-g128": "w4-g128", "damaged (one layer 2-bit)": str(tmp / "damaged.yaml")}
        arts = {}
        for name, recipe in cands.items():
            arts[name] = tmp / name.split()[0]
            rc, _, out = lowbit_cli("quantize", "--model", args.model, "--recipe", recipe, "--out", str(arts[name]), env=env)
            assert rc == 0, out
        rows = []
        from lowbit.eval.basecache import cache_dir

        def entries() -> int:
            return len(list(cache_dir().glob("*.pt"))) if cache_dir().is_dir() else 0

        for mode in (["--quick"], [] if not args.skip_full else None):
            if mode is None:
                continue
            for name, art in arts.items():
                before = entries()
                rc, secs, out = lowbit_cli("gate", "default", args.model, str(art), *mode, "--report-dir",
                                           str(tmp / "reports"), env=env)
                assert rc in (0, 1), out
                cache = "computed" if entries() > before else "cached"
                run = get_run(list_runs(limit=1, db=tmp / "runs.sqlite")[0]["id"], db=tmp / "runs.sqlite")["run"]
                rows.append((name, "quick" if mode else "default", rc, secs, run, cache))
                print(f"{name:28s} {'quick' if mode else 'default':8s} rc={rc} {secs:6.1f} s ({cache})", flush=True)
        html = next((tmp / "reports").glob("gate-*/report.html"))
        png = screenshot(html, tmp / "report.png")
        shot = png_stats(png)

    from lowbit import native

    lines = [
        f"## Gate on {args.model}: time, verdicts and suite scores",
        "",
        f"Written by `benchmarks/gate.py --model {args.model}` on {time.strftime('%Y-%m-%d')}: `lowbit gate default "
        f"{args.model} CANDIDATE [--quick]` through the CLI in a fresh process each (wall time includes Python start, "
        f"loading both models and writing the report). The default spec is in `lowbit/eval/gate.py` and docs/gate.md. "
        f"The damaged candidate is INT8 with `model.layers.3.mlp.down_proj` at 2 bits per channel. 'baseline side': "
        f"whether the run computed the baseline's side of a measurement (the first run of a mode, on a cold cache) or "
        f"read every part from the cache (lowbit/eval/basecache.py). CPU kernels: "
        f"{native.describe()}; the bundled weights sit on a Q4_1 grid (see the presets table).",
        "",
        "| candidate | mode | wall time | baseline side | exit code | verdict | criteria passed (n/a) | failed | mean KLD "
        "| p99 KLD | worst-sample KLD | top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, mode, rc, secs, run, cache in rows:
        crit = run["gate"]["criteria"]
        d = run["divergence"]
        judged = [c for c in crit if c["passed"] is not None]
        failed = ", ".join(c["name"] for c in crit if c["passed"] is False) or "-"
        lines.append(f"| {name} | {mode} | {secs:.0f} s | {cache} | {rc} | {'PASS' if run['gate']['passed'] else 'FAIL'} | "
                     f"{sum(c['passed'] is True for c in judged)}/{len(judged)} ({len(crit) - len(judged)}) | {failed} | "
                     f"{d['mean_kld']:.4f} | {d['p99_kld']:.4f} | {d['max_sample_kld']:.4f} | {d['top1']:.3f} |")
    lines += ["", "Suite scores (default mode where it ran, else quick):", "",
              "| candidate | suite | metric | baseline | candidate | all metrics (baseline -> candidate) |", "|---|---|---|---|---|---|"]
    best = {}
    for name, mode, _, _, run, _ in rows:
        if name not in best or mode == "default":
            best[name] = run
    for name, run in best.items():
        for s in run["suites"]:
            def g(x):
                return "n/a" if x is None or x != x else f"{x:.3g}"

            detail = "; ".join(f"{k} {g(v['baseline'])} -> {g(v['candidate'])}" for k, v in s["metrics"].items())
            lines.append(f"| {name} | {s['name']} | {s['metric']} | {g(s['baseline'])} | {g(s['candidate'])} | {detail} |")
    lines += ["", f"The INT8 gate report rendered in headless Chromium: a {shot.get('width')}x{shot.get('height')} "
                  f"screenshot with {shot.get('distinct_colors', shot.get('colors', '?'))} distinct colours (not blank)."]
    write_section(args.out, f"gate-{args.model}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
