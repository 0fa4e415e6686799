"""Learned rounding and QAT against post-training quantization, on the off-grid variants of the bundled
models (benchmarks/offgrid.py: their weights dithered off the 4/5-bit grid they were shipped on).

    python benchmarks/learned_qat.py learned [--model smollm2-135m] [--schemes w4-g128,w3-g128] [--steps 200]
        [--learn-lr LR] [--learn-init rtn|gptq|awq] [--learn-loss relative|mse|normed|postnorm|lookahead] [--learn-batch B] [--calib-windows N] [--methods rtn,gptq,awq,learned]
        [--blocks N] [--e2e-steps N [--e2e-lr LR] [--e2e-batch B]]
    python benchmarks/learned_qat.py qat [--model smollm2-135m] [--scheme w4-g128] [--qat-steps 260] [--batch 2] [--lr 5e-5]

learned: RTN, GPTQ, AWQ and `--method learned` at each scheme on the same calibration windows (held-out
Wikipedia articles), mean KLD and top-1 against the off-grid FP32 model on other Wikipedia windows,
and each method's time. Section "learned-<model>" of docs/BENCHMARKS.md; with --blocks N (only the first N
decoder blocks quantized, a probe for settings), "learned-<model>-firstN"; with --schemes other than the
default, each scheme appended ("learned-<model>-w4-g128"); with --steps other than 200 or --learn-batch
other than 4, "-<N>steps" or "-batch<B>"; with --calib-windows other than 32 or 256, "-<N>windows"; with --learn-init gptq|awq, the start appended
("learned-<model>-first4-awq"); with --learn-loss other than relative, the loss ("-mse", "-normed"); with
--e2e-steps N (learned rounding, then the scales tuned end to end against the float logits), "-e2e<N>" last
(then "-lr<LR>" and "-b<B>" for --e2e-lr other than 1e-3 and --e2e-batch other than 1).

qat: `lowbit qat` for --qat-steps steps (distillation on the built-in mix set), then RTN, GPTQ and QAT
against the same baseline: mean KLD, the share of RTN's gap QAT recovered, the quick default gate's
suites for RTN and QAT, wall time and the process's peak RSS (this part runs alone in its process).
Section "qat-<model>" (W4 g128) or "qat-<model>-<scheme>".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from benchmarks.presets import write_section  # noqa: E402
from lowbit.calib.sequential import LEARN_INITS, LEARN_LOSSES  # noqa: E402


def recipe(name: str):
    """A preset, or wN-gG: w4-g128 with N-bit asymmetric integers in groups of G (float16 scales), the rest
    of the preset (the head in INT8, nothing ignored) as it is."""
    import dataclasses

    from lowbit.recipe import PRESETS, _int

    if name in PRESETS:
        return PRESETS[name]
    bits, group = name[1:].split("-g")
    return dataclasses.replace(PRESETS["w4-g128"], name=name, description="",
                               scheme=_int(int(bits), "group", int(group), symmetric=False, scale_dtype="float16"))


def setup(args):
    from offgrid import offgrid_path

    from lowbit import api
    from lowbit.calib.data import CalibData
    from lowbit.data.corpora import wikipedia_articles
    from lowbit.eval.divergence import make_samples

    base = api.load(str(offgrid_path(args.model)))
    arts = wikipedia_articles()
    samples = make_samples(base.tokenizer, arts, 256, 16)
    windows = calib_windows(base.tokenizer, arts[len(arts) // 2:], 256, args.calib_windows)
    data = CalibData(torch.stack(windows), "Wikipedia (held-out articles)",
                     {"samples": len(windows), "seq_len": 256, "tokens": len(windows) * 256})
    return base, samples, data


def calib_windows(tok, arts, seq: int, n: int) -> list[torch.Tensor]:
    """Up to n windows of seq tokens: each article cut into consecutive windows, article after article
    (the held-out half holds about 1,000 such windows for SmolLM2's tokenizer)."""
    out = []
    for _, text in arts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        out += [ids[i:i + seq] for i in range(0, ids.numel() - seq + 1, seq)][: n - len(out)]
        if len(out) == n:
            break
    return out


def kld(base, model, samples) -> dict:
    from lowbit.eval.divergence import compare

    d = compare(base.module, model.module, samples, None)
    return {"kld": d["mean_kld"], "top1": d["top1"], "ppl": d["ppl_candidate"], "ppl_base": d["ppl_baseline"]}


def fresh(base):
    import copy

    from lowbit.model.handle import Model

    return Model(copy.deepcopy(base.module), base.tokenizer, dict(base.source), base.folder)


DEFAULT_SCHEMES = "w4-g128,w3-g128"


def learned(args) -> str:
    from lowbit import api
    from lowbit.calib import CalibConfig

    base, samples, data = setup(args)
    rows = []
    schemes = args.schemes.split(",")
    for scheme in schemes:
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            calib = None if method == "rtn" else CalibConfig(method=method, data=data, samples=data.ids.shape[0],
                                                             seq_len=256, learn_steps=args.steps,
                                                             learn_lr=args.learn_lr, learn_init=args.learn_init,
                                                             learn_batch=args.learn_batch,
                                                             learn_loss=args.learn_loss,
                                                             learn_e2e_steps=args.e2e_steps if method == "learned" else 0,
                                                             learn_e2e_lr=args.e2e_lr, learn_e2e_batch=args.e2e_batch)
            q = api.quantize(fresh(base), first_blocks(recipe(scheme), base, args.blocks), calib=calib,
                             progress=_e2e_progress)
            secs = time.perf_counter() - t0
            r = kld(base, q, samples)
            if method == "learned":  # overfitting shows as a training loss far under the held-back one
                blocks = [b for b in q.calibration["learned_blocks"].values() if "loss_learned" in b]
                r["blocks"] = {k: sum(b[k] for b in blocks) / len(blocks)
                               for k in ("loss_start", "loss_learned", "loss_train_first", "loss_train_last")}
                r["kept"] = sum(b["kept"] for b in blocks)
                r["n_blocks"] = len(blocks)
                if "learned_e2e" in q.calibration:
                    r["e2e"] = q.calibration["learned_e2e"]
            rows.append((scheme, method, r, secs))
            print(scheme, method, r, f"{secs:.0f} s", flush=True)
            del q
        body = learned_table(args, data, rows)  # written after each scheme: a run cut short keeps what it measured
        write_section(args.out, f"learned-{args.model}" + (f"-first{args.blocks}" if args.blocks else "")
                      + ("".join(f"-{s}" for s in schemes) if args.schemes != DEFAULT_SCHEMES else "")
                      + (f"-{args.steps}steps" if args.steps != 200 else "")
                      + (f"-batch{args.learn_batch}" if args.learn_batch != 4 else "")
                      + (f"-{args.calib_windows}windows" if args.calib_windows not in (32, 256) else "")
                      + (f"-{args.learn_init}" if args.learn_init != "rtn" else "")
                      + (f"-{args.learn_loss}" if args.learn_loss != "relative" else "")
                      + (f"-e2e{args.e2e_steps}" + (f"-lr{args.e2e_lr:g}" if args.e2e_lr != 1e-3 else "")
                         + (f"-b{args.e2e_batch}" if args.e2e_batch != 1 else "") if args.e2e_steps else ""), body)
    return body


def _e2e_progress(msg: str, done: int, total: int) -> None:
    """Only the end-to-end stage's training KL goes to the log (every 10th step), to watch a long run."""
    if msg.startswith("end-to-end"):
        print(time.strftime("%H:%M:%S"), msg, flush=True)


def first_blocks(rec, base, k: int | None):
    """The recipe with only decoder blocks 0..k-1 quantized (the rest kept in float): a probe that takes
    a fraction of the full run's time. None: the recipe as it is."""
    import dataclasses

    from lowbit.recipe import Override

    if not k:
        return rec
    n = base.module.config.num_hidden_layers
    return dataclasses.replace(rec, overrides=tuple(Override(f"model.layers.{i}.*", None) for i in range(k, n))
                               + rec.overrides)


def learned_table(args, data, rows) -> str:
    from lowbit.native import cpu_name

    lines = ["## Learned rounding vs GPTQ and AWQ (off-grid model)", "",
             f"`benchmarks/learned_qat.py learned --model {args.model} --schemes {args.schemes} --steps {args.steps}"
             + (f" --learn-lr {args.learn_lr:g}" if args.learn_lr else "")
             + (f" --learn-init {args.learn_init}" if args.learn_init != "rtn" else "")
             + (f" --blocks {args.blocks}" if args.blocks else "")
             + (f" --calib-windows {args.calib_windows}" if args.calib_windows != 32 else "")
             + (f" --learn-batch {args.learn_batch}" if args.learn_batch != 4 else "")
             + (f" --learn-loss {args.learn_loss}" if args.learn_loss != "relative" else "")
             + (f" --methods {args.methods}" if args.methods != "rtn,gptq,awq,learned" else "")
             + (f" --e2e-steps {args.e2e_steps}" + (f" --e2e-lr {args.e2e_lr:g}" if args.e2e_lr != 1e-3 else "")
                + (f" --e2e-batch {args.e2e_batch}" if args.e2e_batch != 1 else "") if args.e2e_steps else "") + "` on "
             f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}: the off-grid F32 variant of {args.model} "
             f"(benchmarks/offgrid.py), every method calibrated on the same {data.stats['tokens']} tokens of held-out "
             f"Wikipedia articles, mean KLD and top-1 against the F32 model on 16 x 256 other Wikipedia tokens. "
             + (f"Only the first {args.blocks} decoder block(s) are quantized, the rest kept in float (a probe). "
                if args.blocks else "")
             + f"`learned`: {args.steps} signSGD steps per block (learning rate "
             f"{'%g' % args.learn_lr if args.learn_lr else '2/steps'}, decayed to 0), batch {args.learn_batch} windows, "
             f"started from {dict(gptq='GPTQ', awq='AWQ').get(args.learn_init, 'round to nearest')}, targets the float model's activations, "
             + {"mse": "plain mean squared error.",
                "normed": "each token's squared error over its target's squared norm, every channel weighted by the "
                          "squared gain of the norms that next read it (--learn-loss normed).",
                "postnorm": "each token's squared error after the norms that next read the stream (their gains "
                            "and their division by the token's RMS) over its target's (--learn-loss postnorm).",
                "lookahead": "the mean of two errors, each a token's squared error after the norms that next read "
                             "the stream over its target's: at this block's output and at the output of the next "
                             "block, run in float on it (--learn-loss lookahead; the last block: the first alone)."}.get(
                 args.learn_loss, "each token's squared error over its target's squared norm.")
             + (f" Then (--e2e-steps) the group scales of all blocks, codes fixed, tuned together for "
                f"{args.e2e_steps} Adam steps (learning rate {args.e2e_lr:g} on log(scale), decayed to 0, "
                f"{args.e2e_batch} window(s) a step) against the float model's next-token distribution (KL)."
                if args.e2e_steps else "")
             + ("" if len({r[0] for r in rows}) == len(args.schemes.split(",")) else
                f" Schemes measured so far: {', '.join(dict.fromkeys(r[0] for r in rows))}."), "",
             "| scheme | method | mean KLD | vs GPTQ | top-1 | time |", "|---|---|---|---|---|---|"]
    for scheme, method, r, secs in rows:
        g = next((x[2]["kld"] for x in rows if x[0] == scheme and x[1] == "gptq"), None)  # None: --methods without gptq
        vs = "-" if g is None else f"{r['kld'] / g:.2f}x"
        lines.append(f"| {scheme} | {method} | {r['kld']:.4f} | {vs} | {r['top1']:.3f} | {secs:.0f} s |")
    notes = [(scheme, r) for scheme, method, r, _ in rows if "blocks" in r]
    if notes:
        lines += ["", f"Learned rounding's block losses ({dict(mse='MSE', normed='norm-weighted relative squared error', postnorm='relative squared error after the next norms,', lookahead='relative squared error after the next norms, here and one block on,').get(args.learn_loss, 'relative squared error')} against the float model's activations, mean over blocks): "
                  "on the held-back windows at the start and after learning; on the training "
                  "batches over the first and the last 10 steps."]
        for scheme, r in notes:
            b = r["blocks"]
            lines.append(f"- {scheme}: held-back {b['loss_start']:.4f} -> {b['loss_learned']:.4f}; training "
                         f"{b['loss_train_first']:.4f} -> {b['loss_train_last']:.4f}; learned result kept in "
                         f"{r['kept']} of {r['n_blocks']} blocks.")
            e = r.get("e2e")
            if e and "skipped" in e:
                lines.append(f"- {scheme}, end-to-end scales: skipped ({e['skipped']}).")
            elif e:
                lines.append(f"- {scheme}, end-to-end scales: KL on the {e['held_back_windows']} held-back windows "
                             f"{e['kl_start']:.4f} -> {e['kl_learned']:.4f}; training {e['kl_train_first']:.4f} -> "
                             f"{e['kl_train_last']:.4f}; {'kept' if e['kept'] else 'not kept (the block-wise scales stay)'}; "
                             f"mean |log scale change| {e['scale_change_mean']:.4f} (max {e['scale_change_max']:.3f}); "
                             f"{e['seconds']:.0f} s of the learned time.")
    return "\n".join(lines)


def qat_part(args) -> str:
    from lowbit import api, qat
    from lowbit.calib import CalibConfig
    from lowbit.benchmark.latency import max_rss_bytes
    from lowbit.native import cpu_name

    base, samples, data = setup(args)
    rec = recipe(args.scheme)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = qat.train(base, rec, Path(tmp) / "q", qat.QATConfig(steps=args.qat_steps, lr=args.lr, batch=args.batch,
                                                                  seq_len=256, data="mix", samples=1024),
                        progress=lambda i, n, loss: print(f"step {i}/{n} KL {loss:.4f} "
                                                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                        if i % 10 == 0 or i == 1 else None)
        secs = time.perf_counter() - t0
        peak = max_rss_bytes()
        rtn = api.quantize(fresh(base), rec)
        gptq = api.quantize(fresh(base), rec, calib=CalibConfig(method="gptq", data=data, samples=data.ids.shape[0],
                                                                seq_len=256))
        r = {"RTN": kld(base, rtn, samples), "GPTQ": kld(base, gptq, samples), "QAT": kld(base, res.model, samples)}
        gates = {name: api.gate("default", base, m, quick=True) for name, m in (("RTN", rtn), ("QAT", res.model))}
    recovered = 100 * (r["RTN"]["kld"] - r["QAT"]["kld"]) / r["RTN"]["kld"]
    p0 = r["RTN"]["ppl_base"]
    ppl_rec = 100 * (r["RTN"]["ppl"] - r["QAT"]["ppl"]) / (r["RTN"]["ppl"] - p0) if r["RTN"]["ppl"] > p0 else None
    losses = res.losses
    lines = [f"## QAT vs post-training quantization (off-grid {args.model}, {args.scheme})", "",
             f"`benchmarks/learned_qat.py qat --model {args.model} --scheme {args.scheme} --qat-steps {args.qat_steps} "
             f"--lr {args.lr:g}` on {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}: `lowbit qat` "
             f"({args.qat_steps} steps of {args.batch} x 256 tokens of the built-in mix set, distillation from the off-grid F32 "
             f"model) took {secs / 60:.1f} min; peak RSS of the process {peak / 2**30:.2f} GiB. Mean KLD and top-1 "
             f"against the F32 model on 16 x 256 Wikipedia tokens.", "",
             "| method | mean KLD | vs RTN | top-1 | ppl (F32 {:.2f}) |".format(p0), "|---|---|---|---|---|"]
    for name, v in r.items():
        lines.append(f"| {name} | {v['kld']:.4f} | {v['kld'] / r['RTN']['kld']:.2f}x | {v['top1']:.3f} | {v['ppl']:.2f} |")
    lines += ["", f"QAT recovered {recovered:.0f}% of RTN's KLD gap (goal: at least 40%, KLD_QAT <= 0.6 x KLD_RTN)"
              + (f" and {ppl_rec:.0f}% of its perplexity gap." if ppl_rec is not None else "."),
              f"Training KL (teacher || student) on its own batches: step 1 {losses[0]:.4f}, mean of the last 10 steps "
              f"{sum(losses[-10:]) / len(losses[-10:]):.4f}.", "",
              "The quick default gate's suites, RTN -> QAT (candidate values):", ""]
    for name in ("RTN", "QAT"):
        rows = [f"{c['name']}: {c['value'] if c['value'] is None else round(c['value'], 4)}"
                for c in gates[name]["gate"]["criteria"]]
        lines.append(f"- {name} ({'PASS' if gates[name]['gate']['passed'] else 'FAIL'}): " + "; ".join(rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("learned", "qat"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default=DEFAULT_SCHEMES)
    ap.add_argument("--scheme", default="w4-g128")
    ap.add_argument("--steps", type=int, default=200, help="learned rounding: steps per block")
    ap.add_argument("--qat-steps", type=int, default=260, help="qat: 260 x 2 windows fit 30 min on 2 cores here")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=2, help="qat: windows of 256 tokens per step")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--learn-lr", type=float, default=None, help="learned rounding: None: 2 / steps")
    ap.add_argument("--learn-init", choices=LEARN_INITS, default="rtn")
    ap.add_argument("--learn-loss", choices=LEARN_LOSSES, default="relative",
                    help="learned rounding: per-token relative squared error (the default), the same weighted "
                         "per channel by the reading norms' squared gains (normed), the relative error after "
                         "those norms (postnorm), that and the same one block further on (lookahead), or plain MSE")
    ap.add_argument("--learn-batch", type=int, default=4, help="learned rounding: calibration windows per step")
    ap.add_argument("--e2e-steps", type=int, default=0,
                    help="learned: then tune all blocks' group scales against the float logits for N steps (0: off)")
    ap.add_argument("--e2e-lr", type=float, default=1e-3, help="that stage's Adam learning rate on log(scale)")
    ap.add_argument("--e2e-batch", type=int, default=1, help="that stage's windows per step")
    ap.add_argument("--methods", default="rtn,gptq,awq,learned", help="learned: the methods to run (gptq among them)")
    ap.add_argument("--blocks", type=int, default=None,
                    help="learned: quantize only the first N decoder blocks (a probe; its own section)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.part == "learned":
        print(learned(args))  # writes its section itself, scheme by scheme
        return
    body = qat_part(args)
    print(body)
    # the W4 g128 run keeps the section name it was first recorded under; other schemes get their own
    write_section(args.out, f"qat-{args.model}" + ("" if args.scheme == "w4-g128" else f"-{args.scheme}"), body)


if __name__ == "__main__":
    main()
