"""Which channels of the residual stream carry its energy, and how much the norms that read it scale them.

    python benchmarks/stream_channels.py [--model gemma3-270m] [--scheme w4-g128] [--windows 4] [--top 4]
        [--out docs/BENCHMARKS.md]

The off-grid F32 model (benchmarks/offgrid.py) and a round-to-nearest copy at --scheme run the same
held-out Wikipedia windows; each block's output (the residual stream) is compared over every position but
the first (the attention sink has its own benchmark, sink_share.py). Per block: the --top channels by mean
square and their share of the stream's energy; their share of the quantized copy's squared error (on its
own stream, what learned rounding's loss compares); the gain with which the norms that next read the stream
scale those channels (the root of lowbit.calib.sequential's stream_weight: the next block's input and
MLP-side norms, or the final norm) against the median channel's; and the relative error unweighted (the
"relative" loss) and weighted by those squared gains (the "normed" loss). This is the measurement behind
`--learn-loss normed` (lowbit/calib/learned.py, docs/qat.md). Section "stream-channels-<model>".
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from benchmarks.presets import write_section  # noqa: E402
from lowbit.native import cpu_name  # noqa: E402


def measure(args) -> list[dict]:
    from learned_qat import calib_windows, fresh, recipe
    from offgrid import offgrid_path

    from lowbit import api
    from lowbit.calib.sequential import CalibOptions, _block_out, _BlockLoop
    from lowbit.calib.learned import _err
    from lowbit.data.corpora import wikipedia_articles

    base = api.load(str(offgrid_path(args.model)))
    arts = wikipedia_articles()
    ids = torch.stack(calib_windows(base.tokenizer, arts[len(arts) // 2:], 256, args.windows))
    quant = api.quantize(fresh(base), recipe(args.scheme))

    def outputs(model) -> dict:
        store = {}
        hooks = [layer.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, _block_out(o).detach()))
                 for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return store

    f, q = outputs(base.module), outputs(quant.module)
    loop = _BlockLoop(base.module, recipe(args.scheme), "learned", None, CalibOptions(learn_loss="normed"), None)
    rows = []
    for i in range(len(f)):
        t, y = f[i][:, 1:].float(), q[i][:, 1:].float()
        ms = t.pow(2).mean((0, 1))
        err = (y - t).pow(2).mean((0, 1))
        top = ms.topk(args.top).indices
        w = loop.stream_weight(i)
        gain = w.sqrt()
        rows.append({"block": i, "channels": top.tolist(), "energy": float(ms[top].sum() / ms.sum()),
                     "error": float(err[top].sum() / err.sum()),
                     "gain_top": [float(g) for g in gain[top]], "gain_median": float(gain.median()),
                     "rel": float(_err(y, t, "relative")), "normed": float(_err(y, t, "normed", w))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--scheme", default="w4-g128")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    rows = measure(args)
    lines = [f"## Where the residual stream's energy sits, and what its norms make of it ({args.model})", "",
             f"`benchmarks/stream_channels.py --model {args.model} --scheme {args.scheme} --windows {args.windows} "
             f"--top {args.top}` on {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}: the off-grid F32 "
             f"model and a round-to-nearest {args.scheme} copy on {args.windows} held-out Wikipedia windows of 256 "
             "tokens, every position but the first. Per block output: the top channels by mean square, their share "
             "of the stream's energy and of the quantized copy's squared error (on its own stream); the gain the "
             "norms that next read the stream apply to them (next block's input and MLP-side norms, or the final "
             "norm; probed, so Gemma's (1 + w) counts as such) against the median channel's; the mean relative "
             "error per token, unweighted (`--learn-loss relative`) and weighted by the squared gains "
             "(`--learn-loss normed`).", "",
             "| block | top channels | share of energy | share of error | their gains | median gain | relative error | norm-weighted |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {', '.join(map(str, r['channels']))} | {r['energy']:.2f} | {r['error']:.2f} | "
                     f"{', '.join(f'{g:.2f}' for g in r['gain_top'])} | {r['gain_median']:.2f} | {r['rel']:.4f} | "
                     f"{r['normed']:.4f} |")
    body = "\n".join(lines)
    print(body)
    write_section(args.out, f"stream-channels-{args.model}", body)


if __name__ == "__main__":
    main()
