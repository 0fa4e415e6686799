"""Calibrated quantization side by side: RTN vs GPTQ vs AWQ (and SmoothQuant at W8A8), same model, same text.

    .venv/bin/python benchmarks/calibrated.py [--model smollm2-135m] [--schemes w4-g128,w3-g128,w8a8,w4-g32:gptq]
        [--methods rtn,gptq,awq] [--samples 128] [--seq-len 512] [--tokens 4096]
        [--llamacpp Q4_0,Q4_K_M,Q3_K_M,Q8_0] [--llmcompressor /path/to/venv/bin/python]

Quality is measured like benchmarks/presets.py: the first --tokens tokens of the Wikipedia articles in
the gensim wheel, in windows of 512, mean KL divergence and top-1 agreement against the FP32 model and
perplexity. Calibration uses the built-in 'mix' set (Wikipedia articles from number 40 on, which the
evaluation text never reaches, and the Python documentation), so no evaluated token is calibrated on.

Peer rows are measured in the same run, on the same FP32 baseline and the same evaluation windows:

- llama.cpp (llama-cpp-python, `--llamacpp Q4_0,Q4_K_M,...`): its own quantizer applied to the F32
  GGUF of the baseline, once plainly and, for the K-quants, once with an importance matrix computed
  on the same calibration tokens lowbit calibrates on; logits read through llama.cpp itself.
- llm-compressor (`--llmcompressor PYTHON`, the python of a separate venv made by
  benchmarks/peers/setup_llmcompressor.sh): its GPTQ on the same calibration token ids, saved as a
  compressed-tensors checkpoint and evaluated through lowbit's importer.

Bits/weight are over the decoder blocks' linear layers (the head and embeddings are set apart: every
row here keeps them at 8 bits or more). Results replace the "calibrated-<model>" section of
docs/BENCHMARKS.md.
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
import lowbit  # noqa: E402
from lowbit.calib import CalibConfig  # noqa: E402
from lowbit.data.corpora import wikipedia_text  # noqa: E402
from lowbit.eval.perplexity import token_windows  # noqa: E402
from lowbit.exporters.inspect import artifact_summary  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from lowbit.recipe import PRESETS, Recipe, _int  # noqa: E402
from presets import caveat, compare, write_section  # noqa: E402

SCHEMES = {
    "w4-g128": PRESETS["w4-g128"],
    "w3-g128": Recipe(name="w3-g128", scheme=_int(3, "group", 128, symmetric=False, scale_dtype="float16"),
                      group_fallback="shrink", description="INT3 asymmetric, groups of 128"),
    "w8a8": PRESETS["w8a8-dynamic"],
    "w4-g32": PRESETS["w4-g32"],
    "w4-g128-m": PRESETS["w4-g128-m"],
}


def block_bits(summary: dict) -> float:
    """Bits per weight of a lowbit artifact over the decoder blocks' quantized linear layers."""
    rows = [r for r in summary["modules"] if ".layers." in r["name"] and not r["format"].startswith("kept")]
    return 8 * sum(r["bytes"] for r in rows) / max(sum(r["in_features"] * r["out_features"] for r in rows), 1)


def gguf_block_bits(path: Path) -> tuple[float, str]:
    """Bits per weight of a GGUF over the decoder blocks' 2-D (linear) tensors, and how many of those
    tensors each GGUF type holds (llama.cpp falls back to other types for rows a K-quant cannot split)."""
    from collections import Counter

    from gguf import GGUFReader

    ts = [t for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    types = Counter(t.tensor_type.name for t in ts)
    mix = ", ".join(f"{k} x{v}" for k, v in types.most_common())
    return 8 * sum(int(t.n_bytes) for t in ts) / max(sum(int(t.n_elements) for t in ts), 1), mix


def llamacpp_rows(args, base, windows: torch.Tensor, calib_ids: torch.Tensor, tmp: Path) -> list[dict]:
    """llama.cpp's quantizer on the F32 GGUF of the same baseline, plain and with an imatrix from the
    calibration tokens (K-quants), evaluated through llama.cpp's own logits."""
    from lowbit.exporters import llamacpp

    rows = []
    f32 = llamacpp.baseline_gguf(args.model)
    imx = None
    for gtype in [t for t in args.llamacpp.split(",") if t]:
        for use_imatrix in ((False, True) if "_K" in gtype else (False,)):
            t0 = time.perf_counter()
            if use_imatrix:
                if imx is None:
                    from lowbit.exporters.gguf import imatrix_by_gguf_name

                    stats = llamacpp.importance_matrix(base.module, list(calib_ids))
                    imx = imatrix_by_gguf_name(stats, base.module.config.num_hidden_layers)
                path = tmp / f"{gtype}-imatrix.gguf"
                llamacpp.quantize(f32, path, gtype, imx)
            else:
                path = llamacpp.llama_quantized(args.model, gtype)
            seconds = time.perf_counter() - t0
            lm = llamacpp.LlamaCppLM(path, n_ctx=windows.shape[1])
            m = compare(base.module, lm, windows)
            lm.close()
            bits, mix = gguf_block_bits(path)
            rows.append({"tool": "llama.cpp", "format": gtype + (" + imatrix (same calibration)" if use_imatrix else ""),
                         "types": mix, "bits_per_weight": bits, "ppl": m["ppl"], "kld": m["kld"], "top1": m["top1"],
                         "seconds": seconds if use_imatrix else None, "ppl_base": m["ppl_base"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def llmcompressor_rows(args, base, windows: torch.Tensor, calib_ids: torch.Tensor, tmp: Path) -> list[dict]:
    """llm-compressor's GPTQ, run in its own venv on the same calibration ids, read back by lowbit."""
    import subprocess

    from lowbit.model import sources
    from lowbit.model.load import float_folder

    folder, _ = float_folder(sources.resolve(args.model))
    ids_file = tmp / "calib-ids.json"
    ids_file.write_text(json.dumps(calib_ids.tolist()))
    rows = []
    # asymmetric g128 is lowbit's w4-g128; groups that do not divide a row shrink in both tools
    for scheme, extra in (("W4A16", ["--group-size", "128", "--asymmetric", "--threads", str(torch.get_num_threads())]),):
        out = tmp / f"llmc-{scheme}-{len(rows)}"
        t0 = time.perf_counter()
        run = subprocess.run([args.llmcompressor, str(ROOT / "benchmarks" / "peers" / "llmcompressor_gptq.py"),
                              "--model", str(folder), "--calib", str(ids_file), "--scheme", scheme, *extra,
                              "--out", str(out)], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if run.returncode != 0:
            print(f"llm-compressor {scheme} {extra} failed:\n{run.stderr[-3000:]}", flush=True)
            continue
        info = json.loads(run.stdout.strip().splitlines()[-1])
        model = load_model(str(out)).model
        m = compare(base.module, model, windows)
        label = (f"GPTQ {scheme} g128 {'asym' if '--asymmetric' in extra else 'sym'}, head kept FP32 "
                 f"(llm-compressor {info.get('version', '?')})")
        rows.append({"tool": "llm-compressor", "format": label, "bits_per_weight": ct_block_bits(out),
                     "ppl": m["ppl"], "kld": m["kld"], "top1": m["top1"], "seconds": seconds, "ppl_base": m["ppl_base"],
                     "peak_rss_mb": info.get("peak_rss_mb")})
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def goal_lines(rows: list[dict]) -> list[str]:
    """The quality goal: lowbit W4 g128 mean KLD <= 0.8x llama.cpp Q4_K_M's at no more bits/weight.
    Plain W4 g128 and the w4-g128-m mix (INT8 v/down projections) are judged apart."""
    theirs = [r for r in rows if r["tool"] == "llama.cpp" and r["format"].startswith("Q4_K_M")]
    out = []
    for scheme in ("w4-g128", "w4-g128-m"):
        ours = [r for r in rows if r["tool"] == "lowbit" and r["format"].split()[0] == scheme]
        if not ours or not theirs:
            continue
        best = min(ours, key=lambda r: r["kld"])
        if not out:
            out = ["", "Goal: lowbit W4 g128 mean KLD <= 0.8x llama.cpp Q4_K_M's at no more bits per weight."]
        for t in theirs:
            ratio = best["kld"] / t["kld"]
            met = ratio <= 0.8 and best["bits_per_weight"] <= t["bits_per_weight"] + 1e-9
            out.append(f"- best lowbit {scheme} row ({best['format']}, {best['bits_per_weight']:.2f} bits) vs {t['format']} "
                       f"({t['bits_per_weight']:.2f} bits): KLD {best['kld']:.4f} vs {t['kld']:.4f} = {ratio:.2f}x: "
                       f"{'met' if met else 'not met'}")
    return out


def ct_block_bits(folder: Path) -> float:
    """Bits per weight of a compressed-tensors checkpoint over the decoder blocks' linear layers."""
    from lowbit.exporters.inspect import _BYTES, _header, _numel

    nbytes, params = 0, 0
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in _header(f).items():
            if ".layers." not in k or "norm" in k or k.endswith("weight_shape"):
                continue
            n = _numel(v["shape"])
            nbytes += n * _BYTES.get(v["dtype"], 4)
            if k.endswith(".weight_packed"):
                params += n * 8  # int32 words of eight 4-bit codes
            elif k.endswith(".weight"):
                params += n
    return 8 * nbytes / max(params, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default="w4-g128,w3-g128,w8a8,w4-g32:gptq",
                    help="comma-separated; SCHEME:M1+M2 runs only those methods for that scheme")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default="mix")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--llamacpp", default="Q4_0,Q4_K_M,Q3_K_M,Q8_0",
                    help="llama.cpp types to measure in this run ('' to skip; needs llama-cpp-python)")
    ap.add_argument("--llmcompressor", default=None,
                    help="python of a venv with llm-compressor (benchmarks/peers/setup_llmcompressor.sh)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--section", default=None,
                    help="docs/BENCHMARKS.md section to replace (default calibrated-MODEL); a run of a few rows "
                         "goes in its own section with its own peer rows")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base = load_model(args.model)
    windows = token_windows(base.tokenizer, wikipedia_text(), args.tokens, 512)  # (n, 512)
    rows = []
    from lowbit.calib import load_calibration

    calib_ids = load_calibration(args.calib, base.tokenizer, args.samples, args.seq_len).ids
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.schemes.split(","):
            scheme, _, only = item.partition(":")  # "w4-g32:gptq+awq" runs those methods only
            rec = SCHEMES[scheme]
            methods = only.split("+") if only else args.methods.split(",")
            methods += ["smoothquant"] if scheme == "w8a8" and "rtn" in methods else []
            for method in methods:
                t0 = time.perf_counter()
                out = Path(tmp) / f"{scheme}-{method}"
                loaded = lowbit.quantize(args.model, rec, out=out, calib=CalibConfig(
                    method=method, data=args.calib, samples=args.samples, seq_len=args.seq_len))
                seconds = time.perf_counter() - t0
                s = artifact_summary(out)
                m = compare(base.module, loaded.module, windows)
                rows.append({"tool": "lowbit", "format": f"{scheme} {method}", "label": rec.scheme.label,
                             "bits_per_weight": block_bits(s), "ppl": m["ppl"], "kld": m["kld"],
                             "top1": m["top1"], "seconds": seconds, "ppl_base": m["ppl_base"],
                             "fallbacks": len(loaded.calibration["rtn_fallbacks"])})
                print(json.dumps(rows[-1]), flush=True)
                del loaded
                write_table(args, rows, windows, final=False)  # a partial table survives an interrupted run
        if args.llamacpp:
            rows += llamacpp_rows(args, base, windows, calib_ids, Path(tmp))
            write_table(args, rows, windows, final=False)
        if args.llmcompressor:
            rows += llmcompressor_rows(args, base, windows, calib_ids, Path(tmp))
    write_table(args, rows, windows, final=True)


EMPTY = "''"


def write_table(args, rows: list[dict], windows: torch.Tensor, final: bool) -> None:
    base_ppl = rows[0]["ppl_base"]
    rtn = {r["format"].split()[0]: r["kld"] for r in rows if r["format"].endswith(" rtn")}
    lines = [
        f"## Calibrated quantization on {args.model}: RTN vs GPTQ vs AWQ" + (f" ({args.schemes})" if args.section else ""),
        "",
        f"Written by `benchmarks/calibrated.py --model {args.model} --schemes {args.schemes} --methods {args.methods} "
        f"--samples {args.samples} --seq-len {args.seq_len} --llamacpp {args.llamacpp or EMPTY}"
        + (f" --section {args.section}" if args.section else "") + f"` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}, lowbit {lowbit.__version__}). "
        f"Calibration: built-in set '{args.calib}' ({args.samples} x {args.seq_len} tokens). Evaluation: the first "
        f"{windows.numel()} tokens of the Wikipedia articles in the gensim wheel ({windows.shape[0]} windows of 512), "
        f"KLD and top-1 per predicted token against the FP32 model; FP32 perplexity {base_ppl:.3f}. "
        f"Bits/weight are over the decoder blocks' linear layers (scales and zero points included; every row keeps "
        f"the head and embeddings at 8 bits or more). Time includes reading the checkpoint and calibration; "
        f"llama.cpp's plain rows reuse cached files (no time), its imatrix rows time the imatrix and the quantizer.",
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
    mixes = {r["format"].split()[0]: r["types"] for r in rows if r.get("types")}
    if mixes:
        lines += ["", "Tensor types llama.cpp chose for the decoder blocks' linear layers (a K-quant needs rows "
                  "that are a multiple of 256 and falls back to another type otherwise): "
                  + "; ".join(f"{k}: {v}" for k, v in mixes.items()) + "."]
    lines += goal_lines(rows)
    fell = sum(r.get("fallbacks", 0) for r in rows)
    lines += ["", caveat(args.model)]
    if fell:
        lines += ["", f"{fell} module(s) fell back to round-to-nearest (Hessian not positive definite)."]
    if not final:
        lines += ["", f"Partial: the run was still going (or was stopped) after these {len(rows)} row(s)."]
    if not args.llamacpp:
        lines += ["", "llama.cpp rows are not in this run (--llamacpp '')."]
    if not args.llmcompressor:
        lines += ["", "llm-compressor rows are not in this run (no --llmcompressor venv given)."]
    write_section(args.out, args.section or f"calibrated-{args.model}", "\n".join(lines))
    print(f"wrote {args.out}")



if __name__ == "__main__":
    main()
