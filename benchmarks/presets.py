"""Size, bits per weight and quality of every preset on a real model, against its FP32 baseline.

    .venv/bin/python benchmarks/presets.py [--model smollm2-135m] [--tokens 4096] [--seq-len 512]

Quality is measured on the same token windows for every row: the first --tokens tokens of the
Wikipedia articles shipped in the gensim wheel. Besides perplexity, each row has the mean KL
divergence of the quantized model's next-token distribution from the baseline's, and top-1
agreement. Results replace the "presets" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.data.corpora import wikipedia_text  # noqa: E402
from lowbit.eval.perplexity import token_windows  # noqa: E402
from lowbit.exporters.inspect import artifact_summary  # noqa: E402
from lowbit.model.load import load_model  # noqa: E402
from lowbit.recipe import PRESETS  # noqa: E402

HEAD_NOTE = "The output head, tied to the embeddings, is INT8 per row in every preset, and its rows serve the embedding lookups, so whole-model bits/weight are close to the linear layers' figure. The quantized rows run lowbit's CPU kernels as they stand on this machine"


def head_note() -> str:
    """HEAD_NOTE plus what this CPU does to w8a8-dynamic (7-bit activations without VNNI, as PyTorch does)."""
    from lowbit import native

    vnni = "avx512vnni" in native.supported_isas()
    return HEAD_NOTE + (f" ({native.describe()})." if vnni else
                        f" ({native.describe()}; w8a8-dynamic: 7-bit activations on a CPU without VNNI, which is most "
                        f"of its loss here).")

CAVEATS = {
    "smollm2-135m": "The bundled SmolLM2 weights were distributed as Q4_1 (4-bit, group 32, asymmetric with a float "
                    "minimum), so they already sit on a coarse 4-bit grid: 4-bit rows here look better than they "
                    "would on a true FP16 checkpoint.",
    "gemma3-270m": "Gemma-3-270M was distributed as Q4_K_M GGUF (mostly Q5_0 here); 169M of its 268M parameters "
                   "are embeddings, tied to the head.",
}


def caveat(model: str) -> str:
    """What a reader of a table on `model` needs to know: how its weights were distributed, the head."""
    return (CAVEATS.get(model, "") + " " + head_note()).strip()


@torch.no_grad()
def compare(base_model, model, windows: torch.Tensor) -> dict:
    """Perplexity of both, mean KL(base || model) and top-1 agreement over every predicted token."""
    nll_b = nll_q = kld = agree = 0.0
    n = 0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        lb = base_model(ids).logits[0, :-1].float().log_softmax(-1)  # (seq-1, vocab)
        lq = model(ids).logits[0, :-1].float().log_softmax(-1)
        target = ids[0, 1:]
        nll_b -= lb.gather(-1, target[:, None]).sum().item()
        nll_q -= lq.gather(-1, target[:, None]).sum().item()
        kld += (lb.exp() * (lb - lq)).sum().item()
        agree += (lb.argmax(-1) == lq.argmax(-1)).sum().item()
        n += target.numel()
    return {"ppl_base": float(torch.tensor(nll_b / n).exp()), "ppl": float(torch.tensor(nll_q / n).exp()),
            "kld": kld / n, "top1": agree / n, "tokens": n}


def write_section(path: Path, name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery number here was written by the script named in its section.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    base = load_model(args.model)
    windows = token_windows(base.tokenizer, wikipedia_text(), args.tokens, args.seq_len)
    fp32_bytes = sum(p.numel() * 4 for p in base.module.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            t0 = time.perf_counter()
            loaded = load_model(args.model)
            lowbit.quantize(loaded, name)
            qtime = time.perf_counter() - t0
            art = lowbit.save(loaded.module, Path(tmp) / name)
            s = artifact_summary(art)
            m = compare(base.module, loaded.module, windows)
            rows.append((name, PRESETS[name].scheme.label, s, m, qtime))
            print(f"{name:14s} {s['bytes_on_disk'] / 1e6:7.1f} MB  lin {s['linear_bits_per_weight']:.2f} b/w  "
                  f"ppl {m['ppl']:.3f} (base {m['ppl_base']:.3f})  kld {m['kld']:.4f}  top1 {m['top1']:.3f}", flush=True)
            del loaded

    base_ppl = rows[0][3]["ppl_base"]
    lines = [
        f"## Presets on {args.model}: size and quality vs FP32",
        "",
        f"Written by `benchmarks/presets.py --model {args.model}` on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, lowbit {lowbit.__version__}). "
        f"Text: the first {rows[0][3]['tokens'] + windows.shape[0]} tokens of the Wikipedia articles in the gensim wheel, "
        f"{windows.shape[0]} windows of {args.seq_len}; KLD and top-1 are per predicted token against the FP32 model "
        f"on the same windows. Size is the artifact folder on disk (weights, config, tokenizer). Algorithm: RTN.",
        "",
        "| preset | scheme (linear layers) | size on disk | vs FP32 weights | bits/weight, quantized linears | bits/weight, whole model | perplexity | ppl change | mean KLD | top-1 agreement | quantize time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| FP32 baseline | float32 | {fp32_bytes / 1e6:.1f} MB (weights) | 1.00x | 32 | 32 | {base_ppl:.3f} | - | 0 | 1.000 | - |",
    ]
    for name, label, s, m, qtime in rows:
        lines.append(
            f"| {name} | {label} | {s['bytes_on_disk'] / 1e6:.1f} MB | {s['weight_bytes'] / fp32_bytes:.2f}x | "
            f"{s['linear_bits_per_weight']:.2f} | {s['model_bits_per_weight']:.2f} | {m['ppl']:.3f} | "
            f"{100 * (m['ppl'] / m['ppl_base'] - 1):+.1f}% | {m['kld']:.4f} | {m['top1']:.3f} | {qtime:.0f} s |")
    notes = {n for _, _, s, _, _ in rows for r in s["modules"] if (n := r["note"]) and "tied" not in n}
    lines += ["", caveat(args.model)]
    if notes:
        lines += ["", "Group-size fallbacks applied (recipe `group_fallback: shrink`): " + "; ".join(sorted(notes)) + "."]
    write_section(args.out, f"presets-{args.model}", "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
