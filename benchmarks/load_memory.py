"""Peak memory of quantize-after-load vs quantize-while-loading (`load_in_4bit`), side by side.

    .venv/bin/python benchmarks/load_memory.py [--hidden 1024 --layers 16]

Builds a random Llama of about 300M parameters, saves it as FP32 safetensors (~1.2 GB), then in fresh
subprocesses, alternating, measures peak RSS (the child's own VmHWM) of:
  a) lowbit.load(folder) (float32) followed by lowbit.quantize(model, "nf4"),
  b) lowbit.load(folder, load_in_4bit=True, quant_type="nf4", compute_dtype=bfloat16),
  c) the interpreter with torch and transformers imported and nothing loaded (the floor).
Writes the "load-memory" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time, torch, transformers
import lowbit
from lowbit.benchmark.latency import max_rss_bytes  # VmHWM: ru_maxrss would carry the parent's peak over exec
transformers.utils.logging.disable_progress_bar()
mode, folder = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "after":
    m = lowbit.load(folder)
    lowbit.quantize(m, "nf4")
elif mode == "streaming":
    m = lowbit.load(folder, load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
else:
    m = None
secs = time.perf_counter() - t0
print(json.dumps({"peak_mb": max_rss_bytes() / 2**20, "secs": secs}))
"""


MAKE = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tests.conftest import make_tokenizer
folder, hidden, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
model.save_pretrained(folder)
make_tokenizer().save_pretrained(folder)
print(sum(p.numel() for p in model.parameters()))
"""


def make_model(folder: Path, hidden: int, layers: int) -> int:
    """Built in a child process: ru_maxrss survives fork+exec, so this process must stay small."""
    r = subprocess.run([sys.executable, "-c", MAKE, str(folder), str(hidden), str(layers)], capture_output=True,
                       text=True, check=True, cwd=ROOT)
    return int(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    from benchmarks.presets import write_section

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "random-llama"
        n_params = make_model(folder, args.hidden, args.layers)
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        runs: dict[str, list[dict]] = {"floor": [], "after": [], "streaming": []}
        for _ in range(args.repeats):
            for mode in runs:  # alternate so machine noise hits all three alike
                r = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True,
                                   check=True, cwd=ROOT)
                runs[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(mode, runs[mode][-1], flush=True)
    med = {k: statistics.median(r["peak_mb"] for r in v) for k, v in runs.items()}
    secs = {k: statistics.median(r["secs"] for r in v) for k, v in runs.items()}
    above = {k: med[k] - med["floor"] for k in ("after", "streaming")}
    body = "\n".join([
        "## Peak memory: quantize after loading vs while loading",
        "",
        f"Written by `benchmarks/load_memory.py` on {time.strftime('%Y-%m-%d')}: a random Llama of "
        f"{n_params / 1e6:.0f}M parameters ({args.layers} layers, hidden {args.hidden}) saved as FP32 safetensors "
        f"({disk / 1e9:.2f} GB), loaded in fresh processes, alternating, median of {args.repeats}. Peak RSS is each child's own "
        f"VmHWM; it counts resident pages of memory-mapped files (transformers maps the checkpoint on the float "
        f"path; the streaming path reads it without a map).",
        "",
        "| path | peak RSS | above the import floor | load + quantize time |",
        "|---|---|---|---|",
        f"| interpreter + torch + transformers only | {med['floor']:.0f} MB | - | - |",
        f"| `lowbit.load(folder)` then `lowbit.quantize(model, \"nf4\")` | {med['after']:.0f} MB | {above['after']:.0f} MB | {secs['after']:.1f} s |",
        f"| `lowbit.load(folder, load_in_4bit=True, quant_type=\"nf4\")` | {med['streaming']:.0f} MB | {above['streaming']:.0f} MB | {secs['streaming']:.1f} s |",
        "",
        f"Quantizing while loading needs {above['streaming'] / above['after']:.2f}x the memory (above the floor) of "
        f"loading first; the FP32 weights alone are {4 * n_params / 1e6:.0f} MB.",
    ])
    write_section(args.out, "load-memory", body)
    print(body)


if __name__ == "__main__":
    main()
