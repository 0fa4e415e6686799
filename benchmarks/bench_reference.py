"""Speed and memory of quantized candidates on today's reference compute path, against FP32.

    .venv/bin/python benchmarks/bench_reference.py [--model smollm2-135m] [--requests 6]

For each preset, `lowbit.bench.latency.bench_pair` measures the FP32 baseline and the quantized
candidate alternately, request by request, after warm-up, on the same Wikipedia prompts: prefill and
decode tokens/s, p50/p95 latency, weight bytes, and each model's peak RSS in a fresh process.
Writes the "bench-reference-<model>" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from benchmarks.presets import write_section  # noqa: E402
from lowbit.bench.latency import BenchConfig, bench_pair  # noqa: E402
from lowbit.data.corpora import wikipedia_text  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--presets", default="int8,w8a8-dynamic,w4-g128,nf4")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = BenchConfig(prompt_tokens=128, output_tokens=32, requests=args.requests, warmup=2)
    base = load_model(args.model)
    text = wikipedia_text()
    rows = []
    tmp = tempfile.TemporaryDirectory()
    for name in args.presets.split(","):
        # the candidate is a saved artifact, as a user would bench it: its fresh-process peak RSS then
        # comes from loading the artifact, not from loading FP32 and quantizing
        q = load_model(args.model)
        lowbit.quantize(q.model, name)
        art = lowbit.save(q.model, Path(tmp.name) / name)
        del q
        cand = load_model(art)
        b = bench_pair(base, cand, text, cfg)
        rows.append((name, b))
        r = b["ratios"]
        print(f"{name:14s} decode x{r['decode_tok_s']:.2f} prefill x{r['prefill_tok_s']:.2f} p95 x{r['p95_latency']:.2f} "
              f"weights x{r['weight_bytes']:.2f} rss x{r['peak_rss']:.2f}", flush=True)
        del cand

    def mb(v):
        return "n/a" if v is None else f"{v / 1e6:.0f} MB"

    lines = [
        f"## Speed and memory on the reference path ({args.model})",
        "",
        f"Written by `benchmarks/bench_reference.py --model {args.model}` on {time.strftime('%Y-%m-%d')} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}): {cfg.requests} measured requests per model after "
        f"{cfg.warmup} warm-up, prompts of {cfg.prompt_tokens // 2}-{cfg.max_prompt_tokens} tokens cut from Wikipedia, "
        f"{cfg.output_tokens} greedy new tokens each, batch 1, baseline (FP32) and candidate alternating request by "
        f"request. Candidates are saved artifacts loaded back. Peak RSS: each model alone in a fresh process "
        f"(VmHWM), one request. Quantized modules run the "
        f"reference path (dequantize, then matmul; `w8a8-dynamic` quantizes activations and uses torch._int_mm), so "
        f"this table shows the cost of that path, not a fast kernel. Ratios are candidate / baseline from the same run.",
        "",
        "| candidate | decode tok/s (base -> cand) | decode ratio | prefill ratio | p95 latency (base -> cand) | weight bytes in memory | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in rows:
        bb, cc, r = b["baseline"], b["candidate"], b["ratios"]
        lines.append(f"| {name} | {bb['decode_tok_s']:.1f} -> {cc['decode_tok_s']:.1f} | {r['decode_tok_s']:.2f}x | "
                     f"{r['prefill_tok_s']:.2f}x | {bb['latency_ms']['p95']:.0f} -> {cc['latency_ms']['p95']:.0f} ms | "
                     f"{mb(bb['weight_bytes'])} -> {mb(cc['weight_bytes'])} | {mb(bb['peak_rss_bytes'])} -> "
                     f"{mb(cc['peak_rss_bytes'])} |")
    lines += ["", f"Process floor (interpreter + torch + transformers, nothing loaded): "
                  f"{mb(rows[0][1]['baseline']['rss_floor_bytes'])}."]
    tmp.cleanup()
    write_section(args.out, f"bench-reference-{args.model}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
