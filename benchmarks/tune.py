"""lowbit tune's allocator against llama.cpp's mixes at the same size, on the off-grid models.

    .venv/bin/python benchmarks/tune.py quality [--model smollm2-135m] [--samples 16] [--seq-len 256]
    .venv/bin/python benchmarks/tune.py speed [--model smollm2-135m]

quality: one off-grid variant of the bundled model (benchmarks/offgrid.py: an F32 GGUF whose quantized
weights are dithered within their bins, so no format shares the shipped grid), one set of 16 x 256
calibration tokens (Wikipedia, held out from the evaluation articles) for both llama.cpp's importance
matrix and lowbit's sensitivity measurement and GPTQ, one set of evaluation samples. For each of
llama.cpp's Q4_K_M, Q3_K_M and Q4_0 (with that imatrix), the size of its tensor data is the budget;
lowbit's allocator builds the least-divergence mix under it (GPTQ) and the best uniform scheme that
fits (GPTQ), and every KLD is computed in lowbit's harness against the same F32 baseline (llama.cpp's
files run by llama.cpp). With --gguf-mix, the Q4_K_M-size mix is also restricted to GGUF block types,
exported, and run by llama.cpp.

speed: `lowbit tune` with the default gate and no budget (the smallest model that passes), then a
second budget (--max-bits 6.0) reading the saved measurement: wall time of each.

Results replace the "tune-quality" / "tune-speed" sections of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lowbit import api  # noqa: E402
from lowbit.calib import CalibConfig  # noqa: E402
from lowbit.calib.data import CalibData  # noqa: E402
from lowbit.data.corpora import wikipedia_articles  # noqa: E402
from lowbit.eval.divergence import compare, make_samples  # noqa: E402
from lowbit.model.handle import Model  # noqa: E402
from lowbit.tuner import recipe_for, stored_bytes  # noqa: E402
from lowbit.tuning import for_budget, measure, uniforms  # noqa: E402
from lowbit.tuning.menu import GGUF_MENU, MENU  # noqa: E402

LLAMA_TYPES = ("Q4_K_M", "Q3_K_M", "Q4_0")
GOALS = {"Q4_K_M": 0.7, "Q4_0": 0.5, "Q3_K_M": 0.8}  # issue 14: tuned KLD <= goal x llama.cpp's


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def quality(args) -> str:
    from offgrid import offgrid_path

    from lowbit.exporters import llamacpp

    t0 = time.perf_counter()
    src = offgrid_path(args.model)
    base = api.load(str(src))
    tok = base.tokenizer
    articles = wikipedia_articles()
    samples = make_samples(tok, articles, args.seq_len, args.samples)
    windows = [s.ids for s in make_samples(tok, articles[len(articles) // 2:], args.seq_len, args.calib_windows)]
    data = CalibData(torch.stack(windows), "Wikipedia (held-out articles)",
                     {"samples": len(windows), "seq_len": args.seq_len, "tokens": len(windows) * args.seq_len})
    sha = base.source.get("sha256")
    n_params = sum(p.numel() for p in {id(p): p for p in base.module.parameters()}.values())

    def kld(model) -> dict:
        d = compare(base.module, model, samples, sha)
        return {"kld": d["mean_kld"], "top1": d["top1"]}

    tm = time.perf_counter()
    meas = measure(base, data.ids, MENU, {"source": data.source, "tokens": data.stats["tokens"]})
    t_measure = time.perf_counter() - tm
    print(f"measured in {t_measure:.0f} s", flush=True)

    perm_bytes = sum(4 * m.cols for m in meas.modules)

    def build(alloc, method="gptq", act_order=True):
        rec = recipe_for(alloc, meas, method)
        calib = CalibConfig(method=method, data=data, samples=len(windows), seq_len=args.seq_len, act_order=act_order)
        return api.quantize(Model(copy.deepcopy(base.module), tok, dict(base.source), base.folder), rec, calib=calib)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from lowbit.exporters.gguf import imatrix_by_gguf_name

        imx = imatrix_by_gguf_name(llamacpp.importance_matrix(base.module, windows), base.config.num_hidden_layers)
        imx = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in imx.items()}
        for t in LLAMA_TYPES:  # llama.cpp's own quantizer on the off-grid F32 GGUF, with the imatrix
            path = tmp / f"{t}.gguf"
            llamacpp.quantize(src, path, t, imatrix=imx)
            budget = tensor_bytes(path)
            lm = llamacpp.LlamaCppLM(path, n_ctx=args.seq_len)
            cpp = kld(lm)
            lm.close()
            print(t, budget, cpp, flush=True)
            room = budget - perm_bytes  # GPTQ's act-order permutations are stored too (as lowbit tune reserves)
            mix = for_budget(meas, room)
            fits = [u for u in uniforms(meas) if u.bytes <= room]
            uni = min(fits, key=lambda u: u.est_kld) if fits else None
            m = build(mix)
            mix_kld = kld(m)
            mix_kld["stored"] = stored_bytes(m, m.recipe)
            del m
            uni_kld = None
            if uni is not None:
                m = build(uni)
                uni_kld = kld(m)
                del m
            gguf_row = None
            if args.gguf_mix and t == "Q4_K_M":
                g = for_budget(meas, budget, {o.key for o in GGUF_MENU if o.key in meas.menu})
                m = build(g, act_order=False)
                exp = api.export(m, format="gguf", out=tmp / "mix.gguf", force=True)
                lm = llamacpp.LlamaCppLM(exp.path, n_ctx=args.seq_len)
                gguf_row = (g, kld(m), kld(lm), exp.size)
                lm.close()
                del m
            rows.append((t, budget, cpp, mix, mix_kld, uni, uni_kld, gguf_row))
            print(t, "mix", mix.bits, mix_kld, "uniform", uni.how if uni else None, uni_kld, flush=True)

    bpw = lambda b: 8 * b / n_params  # noqa: E731
    import llama_cpp

    lines = [
        "## lowbit tune's allocation vs llama.cpp's mixes at the same size (off-grid model)",
        "",
        f"`benchmarks/tune.py quality --model {args.model} --samples {args.samples} --seq-len {args.seq_len}` on "
        f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}; "
        f"{time.perf_counter() - t0:.0f} s in all, the sensitivity measurement {t_measure:.0f} s. Model: the off-grid "
        f"variant of {args.model} ({src.name}, benchmarks/offgrid.py). Calibration: {data.stats['tokens']} Wikipedia "
        f"tokens for llama.cpp's imatrix, lowbit's measurement and GPTQ alike. KLD: mean KL(F32 baseline || candidate) "
        f"over {sum(s.ids.numel() - 1 for s in samples)} predicted tokens of {len(samples)} other Wikipedia samples, in "
        f"lowbit's harness (llama.cpp's files run by llama.cpp). Budget: the bytes of llama.cpp's tensor data; "
        f"bits/weight over all {n_params / 1e6:.1f} M parameters.",
        "",
        "| llama.cpp + imatrix | bits/w | KLD | lowbit mix (GPTQ) bits/w | KLD | ratio | goal | best uniform that fits (GPTQ) | KLD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t, budget, cpp, mix, mk, uni, uk, _ in rows:
        ratio = mk["kld"] / cpp["kld"] if cpp["kld"] > 0 else float("nan")
        lines.append(f"| {t} | {bpw(budget):.2f} | {cpp['kld']:.4f} | {bpw(mk['stored']):.2f} | {mk['kld']:.4f} | "
                     f"{ratio:.2f}x | <= {GOALS[t]}x: {'met' if ratio <= GOALS[t] else 'NOT met'} | "
                     f"{uni.how.replace('uniform ', '') if uni else '-'} {uni.bits if uni else 0:.2f} | "
                     f"{uk['kld'] if uk else float('nan'):.4f} |")
    for t, budget, cpp, mix, mk, uni, uk, g in rows:
        if g:
            alloc, lo, cpp_mix, size = g
            lines += ["", f"GGUF-only mix at {t}'s size ({alloc.bits:.2f} bits/weight in lowbit's count; the file "
                          f"{size / 1e6:.1f} MB): KLD {lo['kld']:.4f} run by lowbit, {cpp_mix['kld']:.4f} run by llama.cpp "
                          f"from the exported GGUF."]
    lines += ["", "Formats the mixes chose (modules per format): " + "; ".join(
        f"{t}: " + ", ".join(f"{k} {v}" for k, v in sorted(_count(mix).items())) for t, _, _, mix, *_ in rows)]
    return "\n".join(lines)


def _count(alloc) -> dict:
    from collections import Counter

    return dict(Counter(alloc.choice.values()))


def speed(args) -> str:
    import json

    rows, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("no budget: the smallest model that passes", []),
                             ("--max-bits 6.0, reading the saved measurement", ["--max-bits", "6.0"])):
            out = f"{tmp}/t{len(rows)}"
            cmd = [sys.executable, "-m", "lowbit.cli", "tune", args.model, "--spec", "default", *extra, "--out", out,
                   "--measurement", f"{tmp}/m.json"]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
            secs = time.perf_counter() - t0
            loads.append(os.getloadavg()[1])  # 5-minute load average at the end: > cores means the CPU was shared
            print(p.stdout[-4000:], p.stderr[-2000:], flush=True)
            res = json.loads(Path(f"{out}-tune/tune.json").read_text())
            rows.append((label, secs, p.returncode, res))
    lines = ["## lowbit tune: wall time with the default gate", "",
             f"`benchmarks/tune.py speed --model {args.model}` on {cpu_name()} ({os.cpu_count()} cores), torch "
             f"{torch.__version__}: `lowbit tune {args.model} --spec default` (GPTQ trials, 16 x 256 calibration tokens "
             f"from the mix set, at most 8 trials), then a second budget reading the first run's measurement. The "
             f"measurement is the Fisher-weighted estimate of docs/tune.md. 5-minute load average at the end of each "
             f"run: {', '.join(f'{x:.1f}' for x in loads)} (above {os.cpu_count()}, other work shared the CPU).", "",
             "| run | wall time | measurement | trials | exit code | result |", "|---|---|---|---|---|---|"]
    for label, secs, rc, res in rows:
        best = res.get("best")
        result = (f"trial {best['trial']}: {best['bits']:.2f} bits/weight, mean KLD {best['mean_kld']:.4f}" if best
                  else "none passed: " + "; ".join(res.get("notes", [])))
        meas = "read from file" if rows.index((label, secs, rc, res)) else f"{res['measurement_seconds']:.0f} s"
        lines.append(f"| {label} | {secs / 60:.1f} min | {meas} | {len(res['trials'])} | {rc} | {result} |")
    lines += ["", "Trials of the first run (bits/weight, estimated and measured mean KLD, verdict):", ""]
    for t in rows[0][3]["trials"]:
        lines.append(f"- trial {t['trial']} ({t['how']}, {t['method']}): {t['bits']:.2f} bits/w, est. {t['est_kld']:.4f}, "
                     f"measured {t['mean_kld'] if t['mean_kld'] is None else round(t['mean_kld'], 4)}, "
                     f"{'PASS' if t['passed'] else 'fail: ' + '; '.join(t['failed'])}, {t['seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("quality", "speed"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--gguf-mix", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    body = quality(args) if args.part == "quality" else speed(args)
    from benchmarks.presets import write_section

    name = f"tune-{args.part}" + ("" if args.model == "smollm2-135m" else f"-{args.model}")
    write_section(args.out, name, body)
    print(body)


if __name__ == "__main__":
    main()
