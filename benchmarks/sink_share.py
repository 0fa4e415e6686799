"""How much of each decoder block's quantization error sits on the first token (the attention sink).

    python benchmarks/sink_share.py [--model smollm2-135m] [--scheme w4-g128] [--windows 8] [--out docs/BENCHMARKS.md]

The off-grid F32 model (benchmarks/offgrid.py) and a round-to-nearest copy at --scheme run the same
held-out Wikipedia windows, and each block's output is compared with the float model's at that block,
two ways: the quantized copy on its own stream (the block's input carries the error of every block
before it: what learned rounding's loss compares, block_q(x_q) against the float model's activation),
and each quantized block fed the float model's input to it (a forward pre-hook swaps it in: the block's
own error). Per block: the first position's mean square against the other positions', its share of the
summed squared error (what plain MSE weighs), and, on the quantized stream, its relative error (squared
error over the target's squared norm, what the default relative loss weighs) against the other
positions'. This is the measurement behind learned rounding's relative loss (lowbit/calib/learned.py,
docs/qat.md). Section "sink-share-<model>".
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


def _swap_input(store: dict, i: int):
    def hook(module, args, kwargs):
        if args:
            return (store[i], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": store[i]}
    return hook


def measure(args) -> list[dict]:
    from learned_qat import calib_windows, fresh, recipe
    from offgrid import offgrid_path

    from lowbit import api
    from lowbit.calib.sequential import _block_out
    from lowbit.data.corpora import wikipedia_articles

    base = api.load(str(offgrid_path(args.model)))
    arts = wikipedia_articles()
    ids = torch.stack(calib_windows(base.tokenizer, arts[len(arts) // 2:], 256, args.windows))
    quant = api.quantize(fresh(base), recipe(args.scheme))
    layers_f = base.module.model.layers
    layers_q = quant.module.model.layers
    inputs, outs_f, outs_q, handles = {}, {}, {}, []
    for i, layer in enumerate(layers_f):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: inputs.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: outs_f.__setitem__(i, _block_out(o).detach())))
    for i, layer in enumerate(layers_q):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: outs_q.__setitem__(i, _block_out(o).detach())))
    try:
        with torch.no_grad():
            base.module(ids)
            quant.module(ids)  # on its own stream
            stream = dict(outs_q)
            handles += [layer.register_forward_pre_hook(_swap_input(inputs, i), with_kwargs=True)
                        for i, layer in enumerate(layers_q)]
            quant.module(ids)  # every block on the float model's input to it
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i in range(len(layers_f)):
        t = outs_f[i].float()
        norm = t.pow(2).sum(-1)  # [windows, tokens]
        err = (stream[i].float() - t).pow(2).sum(-1)
        own = (outs_q[i].float() - t).pow(2).sum(-1)
        rel = err / norm.clamp(min=1e-12)
        rows.append({"block": i, "ms0": float(norm[:, 0].mean() / t.shape[-1]),
                     "ms_rest": float(norm[:, 1:].mean() / t.shape[-1]),
                     "share0": float(err[:, 0].sum() / err.sum()), "own0": float(own[:, 0].sum() / own.sum()),
                     "rel0": float(rel[:, 0].mean()), "rel_rest": float(rel[:, 1:].mean())})
    return rows


def table(args, rows) -> str:
    lines = [f"## Where the block error sits: the first token (off-grid {args.model}, RTN {args.scheme})", "",
             f"`benchmarks/sink_share.py --model {args.model} --scheme {args.scheme} --windows {args.windows}` on "
             f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}: {args.windows} held-out Wikipedia "
             "windows of 256 tokens. Mean square of the float model's block output at position 0 and elsewhere. "
             "On the quantized model's own stream (what learned rounding's loss compares): position 0's share of "
             "the block's summed squared error (plain MSE's weight) and the relative error (squared error over the "
             "target's squared norm: the relative loss's weight) at position 0 and elsewhere. Last column: position "
             "0's share when each quantized block is fed the float model's input (the block's own error).", "",
             "| block | mean square, pos 0 | mean square, rest | pos 0 share of squared error | relative error, pos 0 "
             "| relative error, rest | pos 0 share, block on float input |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['ms0']:,.1f} | {r['ms_rest']:,.1f} | {100 * r['share0']:.1f}% | "
                     f"{100 * r['rel0']:.2f}% | {100 * r['rel_rest']:.2f}% | {100 * r['own0']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="w4-g128")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    rows = measure(args)
    body = table(args, rows)
    write_section(args.out, f"sink-share-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
