"""Calibrated quantization side by side: RTN vs GPTQ vs AWQ (and SmoothQuant at W8A8), same model, same text.

    .venv/bin/python benchmarks/calibrated.py [--model smollm2-135m] [--schemes w4-g128,w3-g128,w8a8]
        [--methods rtn,gptq,awq] [--samples 128] [--seq-len 512] [--tokens 4096] [--peers peers.json]

Quality is measured like benchmarks/presets.py: the first --tokens tokens of the Wikipedia articles in
the gensim wheel, in windows of 512, mean KL divergence and top-1 agreement against the FP32 model and
perplexity. Calibration uses the built-in 'mix' set (Wikipedia articles from number 40 on, which the
evaluation text never reaches, and the Python documentation), so no evaluated token is calibrated on.

Peer rows (llama.cpp Q4_0 / Q4_K_M / Q8_0, GPTQModel, llm-compressor) join the same table through
`peer_rows`: a JSON list given with --peers, each row measured on the token windows this script
writes with --dump-tokens (so the peers see exactly the same tokens). Results replace the
"calibrated-<model>" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lowbit  # noqa: E402
from lowbit.calib import CalibOptions, quantize_calibrated  # noqa: E402
from lowbit.data.corpora import wikipedia_text  # noqa: E402
from lowbit.eval.perplexity import token_windows  # noqa: E402
from lowbit.export.inspect import artifact_summary  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from lowbit.recipe import PRESETS, Recipe, _int  # noqa: E402
from presets import CAVEATS, compare, write_section  # noqa: E402

SCHEMES = {
    "w4-g128": PRESETS["w4-g128"],
    "w3-g128": Recipe(name="w3-g128", scheme=_int(3, "group", 128, symmetric=False, scale_dtype="float16"),
                      group_fallback="shrink", description="INT3 asymmetric, groups of 128"),
    "w8a8": PRESETS["w8a8-dynamic"],
}


def peer_rows(path: Path | None) -> list[dict]:
    """HOOK for peer tools: rows measured elsewhere on the same token windows (see --dump-tokens).

    Each row: {"tool": "llama.cpp", "format": "Q4_K_M", "bits_per_weight": 4.9, "ppl": ..., "kld": ...,
    "top1": ..., "seconds": ..., "note": "..."}; bits_per_weight is over the same quantized linears.
    """
    if path is None:
        return []
    rows = json.loads(Path(path).read_text())
    need = {"tool", "format", "bits_per_weight", "ppl", "kld"}
    for i, r in enumerate(rows):
        missing = need - set(r)
        if missing:
            raise SystemExit(f"--peers {path}: row {i} lacks {', '.join(sorted(missing))}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default="mix")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--peers", type=Path, default=None, help="JSON rows from peer tools (see peer_rows)")
    ap.add_argument("--dump-tokens", type=Path, default=None, help="write the evaluation windows (JSON ids) and exit")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base = load_model(args.model)
    windows = token_windows(base.tokenizer, wikipedia_text(), args.tokens, 512)  # (n, 512)
    if args.dump_tokens:
        args.dump_tokens.write_text(json.dumps(windows.tolist()))
        print(f"wrote {windows.shape[0]} windows to {args.dump_tokens}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            rec = SCHEMES[scheme]
            methods = args.methods.split(",") + (["smoothquant"] if scheme == "w8a8" and "rtn" in args.methods else [])
            for method in methods:
                t0 = time.perf_counter()
                out = Path(tmp) / f"{scheme}-{method}"
                loaded = quantize_calibrated(args.model, rec, method, args.calib, args.samples, args.seq_len, out=out,
                                             options=CalibOptions())
                seconds = time.perf_counter() - t0
                s = artifact_summary(out)
                m = compare(base.model, loaded.model, windows)
                rows.append({"tool": "lowbit", "format": f"{scheme} {method}", "label": rec.scheme.label,
                             "bits_per_weight": s["linear_bits_per_weight"], "ppl": m["ppl"], "kld": m["kld"],
                             "top1": m["top1"], "seconds": seconds, "ppl_base": m["ppl_base"],
                             "fallbacks": len(loaded.model.lowbit_calibration["rtn_fallbacks"])})
                print(json.dumps(rows[-1]), flush=True)
                del loaded
                write_table(args, rows, windows, final=False)  # a partial table survives an interrupted run
    write_table(args, rows + peer_rows(args.peers), windows, final=True)


def write_table(args, rows: list[dict], windows: torch.Tensor, final: bool) -> None:
    base_ppl = rows[0]["ppl_base"]
    rtn = {r["format"].split()[0]: r["kld"] for r in rows if r["format"].endswith(" rtn")}
    lines = [
        f"## Calibrated quantization on {args.model}: RTN vs GPTQ vs AWQ",
        "",
        f"Written by `benchmarks/calibrated.py --model {args.model} --schemes {args.schemes} --methods {args.methods} "
        f"--samples {args.samples} --seq-len {args.seq_len}` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}, lowbit {lowbit.__version__}). "
        f"Calibration: built-in set '{args.calib}' ({args.samples} x {args.seq_len} tokens). Evaluation: the first "
        f"{windows.numel()} tokens of the Wikipedia articles in the gensim wheel ({windows.shape[0]} windows of 512), "
        f"KLD and top-1 per predicted token against the FP32 model; FP32 perplexity {base_ppl:.3f}. "
        f"Bits/weight are over the quantized linear layers. Time includes reading the checkpoint and calibration.",
        "",
        "| tool | format | bits/weight | perplexity | mean KLD | KLD vs RTN, same scheme | top-1 | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = r["format"].split()[0]
        ratio = f"{r['kld'] / rtn[key]:.2f}x" if r["tool"] == "lowbit" and key in rtn else "-"
        t = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-"
        top1 = f"{r['top1']:.3f}" if r.get("top1") is not None else "-"
        lines.append(f"| {r['tool']} | {r['format']} | {r['bits_per_weight']:.2f} | {r['ppl']:.3f} | {r['kld']:.4f} | "
                     f"{ratio} | {top1} | {t} |")
    fell = sum(r.get("fallbacks", 0) for r in rows)
    lines += ["", CAVEATS.get(args.model, "")]
    if fell:
        lines += ["", f"{fell} module(s) fell back to round-to-nearest (Hessian not positive definite)."]
    if not final:
        lines += ["", f"Partial: the run was still going (or was stopped) after these {len(rows)} row(s)."]
    if not args.peers:
        lines += ["", "Peer rows (llama.cpp, GPTQModel, llm-compressor) are not in this run: pass them with --peers."]
    write_section(args.out, f"calibrated-{args.model}", "\n".join(lines))
    print(f"wrote {args.out}")



if __name__ == "__main__":
    main()
