"""Resident memory of loading a quantized artifact and running one forward pass, per bit width.

    .venv/bin/python benchmarks/artifact_memory.py [--model smollm2-135m] [--schemes w4-g128,w3-g128,int8] [--repeats 3]

Quantizes the bundled model with each scheme by round to nearest (benchmarks/learned_qat.py's recipe
helper: wN-gG is w4-g128 with N-bit integers in groups of G), saves the artifacts, then in fresh child
processes, alternating, measures each child's peak RSS (VmHWM) after `lowbit.load(artifact)` and one
forward pass of 64 tokens, with the interpreter's own floor (torch and transformers imported, nothing
loaded) measured the same way. Odd widths (3, 5, 6, 7 bits) unpack through another path than 4 and 8
bits; this is where a leak in that path shows. Section "artifact-memory" of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, torch, transformers
transformers.utils.logging.disable_progress_bar()
from lowbit.benchmark.latency import max_rss_bytes
folder = sys.argv[1]
if folder != "-":
    from lowbit import api
    m = api.load(folder)
    with torch.no_grad():
        m.module(torch.arange(64).reshape(1, 64) + 100)
print(json.dumps({"peak_mb": max_rss_bytes() / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default="w4-g128,w3-g128,int8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    import torch
    import transformers

    from benchmarks.presets import write_section
    from learned_qat import recipe
    from lowbit import api
    from lowbit.native import cpu_name

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    schemes = args.schemes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        sizes, folders = {}, {"floor": "-"}
        for name in schemes:
            folder = Path(tmp) / name
            api.save(api.quantize(api.load(args.model), recipe(name)), folder)
            folders[name] = str(folder)
            sizes[name] = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        peaks: dict[str, list[float]] = {k: [] for k in folders}
        for _ in range(args.repeats):
            for name, folder in folders.items():  # alternating: noise hits every scheme alike
                r = subprocess.run([sys.executable, "-c", CHILD, folder], capture_output=True, text=True, check=True,
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                peaks[name].append(json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"])
                print(name, round(peaks[name][-1]), "MB", flush=True)
    med = {k: statistics.median(v) for k, v in peaks.items()}
    lines = ["## Resident memory of loading an artifact, per bit width", "",
             f"`benchmarks/artifact_memory.py --model {args.model} --schemes {args.schemes} --repeats {args.repeats}` on "
             f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}: {args.model} quantized by round to "
             f"nearest, saved, then loaded in fresh processes (alternating, median of {args.repeats}) and run on one "
             f"64-token forward pass; peak RSS is the child's own VmHWM. The floor is the same child with torch and "
             f"transformers imported and nothing loaded ({med['floor']:.0f} MB).", "",
             "| scheme | artifact weights on disk | peak RSS | above the floor | spread (max - min) |", "|---|---|---|---|---|"]
    for name in schemes:
        lines.append(f"| {name} | {sizes[name] / 2**20:.0f} MiB | {med[name]:.0f} MB | {med[name] - med['floor']:.0f} MB "
                     f"| {max(peaks[name]) - min(peaks[name]):.0f} MB |")
    body = "\n".join(lines)
    write_section(args.out, "artifact-memory", body)
    print(body)


if __name__ == "__main__":
    main()
