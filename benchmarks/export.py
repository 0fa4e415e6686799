"""Exports to real runtimes, side by side with llama.cpp's own quantization of the same baseline.

    .venv/bin/python benchmarks/export.py [--model smollm2-135m] [--samples 8] [--seq-len 256]

One run, one set of token samples (Wikipedia articles from the gensim wheel), one FP32 baseline
(lowbit's dequantization of the bundled GGUF). Every KLD is computed by lowbit's harness
(lowbit.eval.divergence.compare) against that baseline:

  - lowbit -> GGUF rows: lowbit quantizes, exports, and the row gives the KLD of lowbit's own model
    and of llama.cpp (llama-cpp-python) running the exported file, plus the KLD between the two;
  - lowbit -> compressed-tensors rows: the KLD of lowbit's model and of transformers running the
    exported folder (AutoModelForCausalLM.from_pretrained, CPU, FP32), plus their max logit difference;
  - llama.cpp rows: llama.cpp's own quantizer applied to an F32 GGUF of the same baseline, run by
    llama.cpp.

Sizes are file (or folder) bytes; bits/weight = 8 * bytes / parameters of the model (embeddings
included). Results replace the "export" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowbit.data.corpora import wikipedia_articles  # noqa: E402
from lowbit.eval.divergence import compare, make_samples  # noqa: E402
from lowbit.exporters import llamacpp  # noqa: E402
from lowbit.exporters.compressed import write_compressed  # noqa: E402
from lowbit.exporters.gguf import write_gguf  # noqa: E402
from lowbit.formats import QuantSpec  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from lowbit.model.quantize import quantize_model  # noqa: E402
from lowbit.recipe import Recipe  # noqa: E402


def _g32(bits: int, symmetric: bool = True, zero_domain: str = "int") -> QuantSpec:
    return QuantSpec(kind="int", bits=bits, granularity="group", group_size=32, symmetric=symmetric,
                     zero_domain=zero_domain, scale_dtype="float16")


_G64_ASYM = QuantSpec(kind="int", bits=4, granularity="group", group_size=64, symmetric=False, scale_dtype="float16")
GGUF_ROWS = [  # (label, lowbit scheme, --type, write_gguf's use_float_source)
    ("int8 sym g32 -> Q8_0 (exact)", _g32(8), "auto", True),
    ("int5 sym g32 -> Q5_0 (exact)", _g32(5), "auto", True),
    ("int5 asym-f g32 -> Q5_1 (exact)", _g32(5, False, "float"), "auto", True),
    ("int4 sym g32 -> Q4_0 (exact)", _g32(4), "auto", True),
    ("int4 asym-f g32 -> Q4_1 (exact)", _g32(4, False, "float"), "auto", True),
    ("int4 asym g64 -> Q4_1 (requantized from lowbit's codes)", _G64_ASYM, "auto", False),
    ("int4 asym g64 -> Q4_1 (quantized from the float source)", _G64_ASYM, "auto", True),
]
CT_ROWS = [
    ("W4A16 int4 sym g32 (pack-quantized)", _g32(4)),
    ("W8A16 int8 sym channel (pack-quantized)", QuantSpec(kind="int", bits=8, granularity="channel")),
    ("W8A8 int8 channel, dynamic per-token (int-quantized)", QuantSpec(kind="int", bits=8, granularity="channel",
                                                                       activation="int8_dynamic")),
    ("FP8 E4M3 channel (float-quantized)", QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel")),
]
LLAMA_TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M"]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import llama_cpp
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()

    base = load_model(args.model)
    articles = wikipedia_articles()
    samples = make_samples(base.tokenizer, articles, args.seq_len, args.samples)
    calib = [s.ids for s in make_samples(base.tokenizer, articles[len(articles) // 2:], args.seq_len, 8)]
    sha = base.source["sha256"]
    n_params = sum(p.numel() for p in {id(p): p for p in base.module.parameters()}.values())

    def kld(model) -> dict:
        d = compare(base.module, model, samples, sha)
        return {"kld": d["mean_kld"], "top1": d["top1"], "ppl": d["ppl_candidate"], "ppl_base": d["ppl_baseline"]}

    def pair_kld(ref, cand) -> float:
        return compare(ref, cand, samples, None, use_cache=False)["mean_kld"]

    gguf_rows, ct_rows, cpp_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = llamacpp.baseline_gguf(args.model)
        lm = llamacpp.LlamaCppLM(f32, n_ctx=args.seq_len)
        cpp_rows.append(("F32 (the baseline, as a GGUF)", _size(f32), kld(lm)))
        lm.close()
        for label, spec, gtype, use_float_source in GGUF_ROWS:
            model = copy.deepcopy(base.module)
            quantize_model(model, Recipe(scheme=spec))
            res = write_gguf(model, tmp / "x.gguf", gtype, base.source, base.folder, use_float_source=use_float_source)
            lm = llamacpp.LlamaCppLM(res.path, n_ctx=args.seq_len)
            gguf_rows.append((label, res.size, kld(model), kld(lm), pair_kld(model, lm)))
            lm.close()
            del model
        imx = llamacpp.importance_matrix(base.module, calib)
        res = write_gguf(base.module, tmp / "k.gguf", "Q4_K_M", base.source, base.folder, imx)
        lm = llamacpp.LlamaCppLM(res.path, n_ctx=args.seq_len)
        gguf_rows.append(("FP32 -> Q4_K_M by llama.cpp, lowbit's imatrix", res.size, None, kld(lm), None))
        lm.close()
        for label, spec in CT_ROWS:
            model = copy.deepcopy(base.module)
            quantize_model(model, Recipe(scheme=spec))
            write_compressed(model, base.tokenizer, tmp / "ct", force=True)
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "ct"), dtype=torch.float32).eval()
            with torch.no_grad():
                diff = max((hf(s.ids[None]).logits - model(s.ids[None]).logits).abs().max().item() for s in samples[:2])
            ct_rows.append((label, _size(tmp / "ct"), kld(model), kld(hf), diff))
            del model, hf
        for t in LLAMA_TYPES:
            path = llamacpp.llama_quantized(args.model, t)
            lm = llamacpp.LlamaCppLM(path, n_ctx=args.seq_len)
            cpp_rows.append((t, _size(path), kld(lm)))
            lm.close()

    bpw = lambda b: 8 * b / n_params  # noqa: E731
    mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
    lines = [
        "## Exports to real runtimes (llama.cpp, transformers) vs llama.cpp's own quantization",
        "",
        f"`benchmarks/export.py --model {args.model} --samples {args.samples} --seq-len {args.seq_len}`; "
        f"{platform.machine()}, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, "
        f"transformers {transformers.__version__}; {time.perf_counter() - t0:.0f} s. KLD: mean KL(baseline || candidate) "
        f"over {sum(s.ids.numel() - 1 for s in samples)} predicted tokens of {len(samples)} Wikipedia samples, in lowbit's "
        f"harness; baseline perplexity {gguf_rows[0][2]['ppl_base']:.2f}. Bits/weight over all {n_params / 1e6:.1f} M "
        f"parameters, embeddings included.",
        "",
        "### lowbit -> GGUF, run by lowbit and by llama.cpp",
        "",
        "| export | size MB | bits/w | KLD lowbit | KLD llama.cpp | KLD llama.cpp vs lowbit | top-1 llama.cpp |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, size, lo, cpp, pair in gguf_rows:
        lo_kld = "-" if lo is None else f"{lo['kld']:.4f}"
        pair_kld_s = "-" if pair is None else f"{pair:.4f}"
        lines.append(f"| {label} | {mb(size)} | {bpw(size):.2f} | {lo_kld} | {cpp['kld']:.4f} | {pair_kld_s} | "
                     f"{cpp['top1']:.3f} |")
    lines += ["", "### llama.cpp's own quantization of the same FP32 baseline", "",
              "| llama.cpp type | size MB | bits/w | KLD | top-1 | perplexity |", "|---|---|---|---|---|---|"]
    for t, size, r in cpp_rows:
        lines.append(f"| {t} | {mb(size)} | {bpw(size):.2f} | {r['kld']:.4f} | {r['top1']:.3f} | {r['ppl']:.2f} |")
    lines += ["", "### lowbit -> compressed-tensors, run by lowbit and by transformers", "",
              "| export | size MB | bits/w | KLD lowbit | KLD transformers | max logit diff |", "|---|---|---|---|---|---|"]
    for label, size, lo, hf, diff in ct_rows:
        lines.append(f"| {label} | {mb(size)} | {bpw(size):.2f} | {lo['kld']:.4f} | {hf['kld']:.4f} | {diff:.4f} |")
    lines += ["",
              "Exact rows are written block for block from lowbit's codes; llama.cpp then differs from lowbit only by "
              "its 8-bit activation rounding in quantized dot products. A scheme no GGUF type holds is quantized "
              "again: by default from the float source (the row's 'KLD lowbit' is then the lowbit model's, not the "
              "file's), or from lowbit's dequantized weights (rounded twice). SmolLM2's 576-wide rows are not divisible by "
              "256, so llama.cpp's K-quant mixes fall back to Q5_0/Q5_1/Q8_0 on most tensors (only the 1536-wide "
              "ffn_down rows take K-quants); the bundled weights already sit on a Q4_1 grid, so 4-bit rows look "
              "better here than they would on an FP16 checkpoint. Kept tensors (embeddings; the tied head) are F16 in "
              "lowbit's GGUFs and quantized by llama.cpp's own mixes, which is most of the size difference."]
    from benchmarks.presets import write_section

    write_section(args.out, "export", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
