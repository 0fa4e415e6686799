"""Structured-output guardrails on the bundled model: what the `structured` and `json_tasks` suites
see next to Wikipedia divergence, for honest candidates and planted damage.

Candidates: INT8 and W4-g128 (round to nearest) from the presets, and the FP32 model with the output
head rows of its JSON punctuation tokens (tokens made only of {}[]:," characters) scaled by a factor
(damage aimed at structure; the rest of the model untouched). For each: Wikipedia mean KLD and top-1
agreement (the `general` pass), the structured suite's KLD on structure and value tokens and its
lost structure top-1, and the JSON tasks' valid / correct rates.

Writes the "Structured-output guardrails" section of docs/BENCHMARKS.md.

    python benchmarks/structured.py [--model smollm2-135m] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from presets import write_section  # noqa: E402
from tests.eval.test_structured import damage_structure_rows  # noqa: E402  (the planted damage the tests use)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="the suites' quick sizes")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import torch
    import transformers

    import lowbit
    from lowbit import EvalConfig
    from lowbit.native import cpu_name, describe

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base = lowbit.load(args.model)
    candidates = {"INT8 (int8)": lambda: lowbit.quantize(lowbit.load(args.model), "int8"),
                  "W4 g128 RTN (w4-g128)": lambda: lowbit.quantize(lowbit.load(args.model), "w4-g128")}
    for f in (0.95, 0.85, 0.7):
        def damaged(f=f):
            m = lowbit.load(args.model)
            damage_structure_rows(m.module, m.tokenizer, f)
            return m
        candidates[f"FP32, structure head rows x{f}"] = damaged
    cfg = EvalConfig(suites=("general", "structured", "json_tasks"), quick=args.quick, samples=8, seq_len=256)
    rows = []
    t0 = time.perf_counter()
    for name, make in candidates.items():
        cand = make()
        run = lowbit.evaluate(base, cand, config=cfg)
        s = {r["name"]: r for r in run["suites"]}
        st, jt = s["structured"]["metrics"], s["json_tasks"]["metrics"]
        rows.append((name, run["divergence"]["mean_kld"], run["divergence"]["top1"], st["struct_kld"]["candidate"],
                     st["value_kld"]["candidate"], st["struct_top1_loss_pct"]["candidate"],
                     jt["valid_pct"]["baseline"], jt["valid_pct"]["candidate"], jt["correct_pct"]["candidate"]))
        print(rows[-1], flush=True)
        del cand
    secs = time.perf_counter() - t0
    n_struct = s["structured"]["n"]
    lines = ["## Structured-output guardrails", "",
             f"`benchmarks/structured.py` on {args.model}, {cpu_name()} ({describe()}), {secs:.0f} s in all. "
             f"Wikipedia divergence: 8 samples x 256 tokens. `structured`: {n_struct} teacher-forced JSON answers "
             f"(Wikipedia extraction tasks and BFCL ground-truth calls when bfcl-eval is installed). `json_tasks`: "
             f"{s['json_tasks']['n']} generated formatting tasks. The damaged rows scale the output head rows of the "
             f"tokens made only of JSON punctuation; nothing else changes.", "",
             "| candidate | Wikipedia mean KLD | Wikipedia top-1 | structure KLD | value KLD | structure top-1 lost % "
             "| JSON tasks valid % (base -> cand) | JSON tasks correct % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.4f} | {r[2]:.3f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.1f} | "
                     f"{r[6]:.0f} -> {r[7]:.0f} | {r[8]:.0f} |")
    write_section(args.out, "structured", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
