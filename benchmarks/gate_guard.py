"""What the default gate catches, and what it lets through: honest candidates over several calibration
seeds (no false alarm wanted) and regressions planted on purpose at several strengths.

    python benchmarks/gate_guard.py [--model smollm2-135m] [--seeds 5] [--json runs.json]
    python benchmarks/gate_guard.py --from-json runs.json     # re-judge stored runs with today's default spec

Every candidate runs `lowbit.gate(SPEC, baseline, candidate)` in this process, where SPEC is the
default spec (lowbit/eval/gate.py) with each of its criteria: the runs store every measurement, so the
table re-judges them with the default spec as it is when the table is written (`--from-json`).

Honest: INT8 (GPTQ) and W8A8 (SmoothQuant, per-token dynamic activations), each calibrated on 32 x 256
tokens of the built-in mix set shuffled with seeds 0..N-1. Planted (tests/plant.py), each on the
INT8 round-to-nearest model, which passes: one MLP down-projection requantized to 4/3/2 bits; the
head's logits of JSON-punctuation tokens scaled; rotary positions past 512 stretched; keys and values
more than 256 positions behind the newest crushed to 4/2 bits.

Writes the "gate-guard" section of docs/BENCHMARKS.md: per candidate every criterion's value and
the verdict, and for the honest runs the spread of each value next to its threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.presets import write_section  # noqa: E402

LAYER = "model.layers.3.mlp.down_proj"
# (column title, criterion row name as lowbit.eval.gate names it)
COLUMNS = [("mean KLD", "mean KLD"), ("p99 KLD", "p99 token KLD"), ("worst sample", "worst sample mean KLD"),
           ("top-1", "top-1 agreement"), ("ppl +%", "general ppl increase %"),
           ("jargon drop", "jargon: token accuracy drop (points)"),
           ("long ppl +%", "long context: ppl_1024_2048 increase %"),
           ("needle drop", "long context: needle retrieval drop (points)"),
           ("struct KLD", "structured: KLD on JSON structure tokens"),
           ("struct top-1 lost %", "structured: structure tokens no longer top-1 %"),
           ("struct NLL +", "structured: NLL increase on structure tokens (nats)"),
           ("JSON tasks valid drop", "json tasks: valid JSON drop (points)"),
           ("JSON tasks correct drop", "json tasks: correct answers drop (points)"),
           ("p95 impr. %", "p95 latency improvement %"), ("decode speedup", "decode tokens/s speedup"),
           ("weights -%", "weight memory reduction %"), ("process -%", "process memory reduction %")]


def candidates(model: str, seeds: int, layer: str = LAYER):
    import lowbit
    from lowbit.calib import CalibConfig
    from lowbit.calib.data import builtin_texts
    from tests import plant

    def shuffled(seed: int) -> list[str]:
        texts = builtin_texts("mix")
        random.Random(seed).shuffle(texts)
        return texts

    out = []
    for s in range(seeds):
        out.append(("honest", "INT8 GPTQ", f"seed {s}", lambda s=s: lowbit.quantize(
            lowbit.load(model), "int8", calib=CalibConfig(method="gptq", data=shuffled(s), samples=32, seq_len=256))))
    for s in range(seeds):
        out.append(("honest", "W8A8 SmoothQuant", f"seed {s}", lambda s=s: lowbit.quantize(
            lowbit.load(model), "w8a8-dynamic",
            calib=CalibConfig(method="smoothquant", data=shuffled(s), samples=32, seq_len=256))))

    def int8():
        return lowbit.quantize(lowbit.load(model), "int8")

    out.append(("reference", "INT8 RTN (what the damage is planted on)", "-", int8))
    for bits in (4, 3, 2):
        out.append(("planted", f"{layer} requantized", f"{bits} bits",
                    lambda bits=bits: lowbit.quantize(lowbit.load(model), plant.crushed_layer_recipe("int8", layer, bits))))

    def with_damage(fn):
        def make():
            m = int8()
            fn(m)
            return m
        return make

    for f in (0.95, 0.85, 0.7):
        out.append(("planted", "JSON-punctuation head logits scaled", f"x{f}",
                    with_damage(lambda m, f=f: plant.scale_structure_rows(m, f))))
    for f in (1.25, 2.0):
        out.append(("planted", "rotary positions past 512 stretched", f"x{f}",
                    with_damage(lambda m, f=f: plant.stretch_rotary_past(m, 512, f))))
    for bits in (4, 2):
        out.append(("planted", "KV entries > 256 positions old crushed", f"{bits} bits",
                    with_damage(lambda m, bits=bits: plant.crush_old_kv(m, 256, bits))))
    return out


def slim(run: dict) -> dict:
    """What the table needs: drop per-sample lists and histograms."""
    run = dict(run)
    if "divergence" in run:
        run["divergence"] = {k: v for k, v in run["divergence"].items() if k not in ("per_sample", "kld_hist", "worst")}
    if "bench" in run:
        run["bench"] = {k: ({kk: vv for kk, vv in v.items() if kk != "latencies_ms"} if isinstance(v, dict) else v)
                        for k, v in run["bench"].items()}
    run["suites"] = [{k: v for k, v in s.items() if k != "worst"} for s in run.get("suites", [])]
    return run


def measure(args) -> list[dict]:
    import torch
    import transformers

    import lowbit
    from lowbit.eval.gate import load_spec

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    spec = load_spec("default")
    base = lowbit.load(args.model)
    rows = []
    for group, what, strength, make in candidates(args.model, args.seeds, args.layer):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cand = make()
        made = time.perf_counter() - t0
        t1 = time.perf_counter()
        run = lowbit.gate(spec, base, cand)
        rows.append({"group": group, "what": what, "strength": strength, "make_s": made,
                     "gate_s": time.perf_counter() - t1, "run": slim(run), "load_avg": os.getloadavg()[1]})
        g = run["gate"]
        print(f"{group} | {what} | {strength}: {'PASS' if g['passed'] else 'FAIL'} in {rows[-1]['gate_s']:.0f} s; failed: "
              f"{[r['name'] for r in g['criteria'] if r['passed'] is False]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
        del cand
    return rows


def fmt(v) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    return f"{v:.4f}" if a < 0.1 else f"{v:.3f}" if a < 10 else f"{v:.1f}"


def table(rows: list[dict], model: str) -> str:
    from lowbit import native
    from lowbit.eval.gate import evaluate, load_spec

    spec = load_spec("default")
    judged = [(r, evaluate(spec, r["run"])) for r in rows]
    cpu = native.describe()
    secs = sum(r["make_s"] + r["gate_s"] for r in rows)
    lines = [f"`benchmarks/gate_guard.py --model {model}` ({native.cpu_name()}, {cpu}; {secs / 60:.0f} min in all). "
             f"Each row is one `lowbit gate default` run in one process against the FP32 baseline (its side cached "
             f"after the first run); the verdicts are the default spec's as written in lowbit/eval/gate.py. A cell is "
             f"the criterion's value, **bold** where it fails; n/a: not applicable (the json suite: the bundled model "
             f"writes no valid BFCL call).", ""]
    head = ["group", "candidate", "strength"] + [c for c, _ in COLUMNS] + ["verdict", "gate s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, g in judged:
        crit = {c["name"]: c for c in g["criteria"]}
        cells = []
        for _, name in COLUMNS:
            c = crit.get(name)
            if c is None:
                cells.append("-")
                continue
            v = fmt(c["value"])
            cells.append(f"**{v}**" if c["passed"] is False else v)
        failed = sum(c["passed"] is False for c in g["criteria"])
        lines.append("| " + " | ".join([r["group"], r["what"], r["strength"]] + cells
                                       + ["PASS" if g["passed"] else f"FAIL ({failed})", f"{r['gate_s']:.0f}"]) + " |")
    honest = [(r, g) for r, g in judged if r["group"] == "honest"]
    if honest:
        n_pass = sum(g["passed"] for _, g in honest)
        lines += ["", f"Honest candidates passing the default gate: {n_pass} of {len(honest)}. Spread of each "
                      f"criterion over them (min / max) against the default threshold:", "",
                  "| criterion | min | max | threshold |", "|---|---|---|---|"]
        for _, name in COLUMNS:
            vals = [c["value"] for _, g in honest for c in g["criteria"] if c["name"] == name and c["value"] is not None]
            thr = next((c for _, g in honest for c in g["criteria"] if c["name"] == name), None)
            if vals and thr:
                lines.append(f"| {name} | {fmt(min(vals))} | {fmt(max(vals))} | {thr['op']} {thr['threshold']:g} |")
    planted = [(r, g) for r, g in judged if r["group"] == "planted"]
    if planted:
        lines += ["", "Which criteria caught each planted regression:", ""]
        for r, g in planted:
            names = [c["name"] for c in g["criteria"] if c["passed"] is False]
            lines.append(f"- {r['what']}, {r['strength']}: " + (", ".join(names) if names else "**nothing (passed)**"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--layer", default=LAYER, help="the module the crushed-layer damage requantizes")
    ap.add_argument("--json", type=Path, help="store the runs here (and re-judge them later with --from-json)")
    ap.add_argument("--from-json", type=Path, help="judge stored runs again; measure nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    rows = json.loads(args.from_json.read_text()) if args.from_json else measure(args)
    body = "## The default gate against honest and planted candidates\n\n" + table(rows, args.model)
    print(body)
    write_section(args.out, "gate-guard", body)


if __name__ == "__main__":
    main()
