"""lowbit's native kernel paths on this CPU: build time, self-check time, and where small-batch products
stop paying (the limit native.DEQUANT_ROWS sets), side by side in one run.

    .venv/bin/python benchmarks/native_paths.py [--repeats 20]

For every instruction-set path this CPU runs: the time to compile kernels.c for it (into an empty
cache folder) and the time of its known-answer self-check (median of 5). Then, on the default path,
the time of one product of SmolLM2's MLP shapes (1536 x 576 and 576 x 1536) at 1 to 128 activation
rows: the native kernel (int8 activations) against the float GEMM on weights dequantized once per call
(what kernels.run does from DEQUANT_ROWS rows on), for INT8 per channel and INT4 g64. 2 threads,
medians of --repeats calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowbit import native  # noqa: E402
from lowbit.formats import QuantSpec  # noqa: E402
from lowbit.model import kernels  # noqa: E402
from lowbit.model.qlinear import QLinear  # noqa: E402
from benchmarks.presets import write_section  # noqa: E402

SHAPES = ((1536, 576), (576, 1536))
ROWS = (1, 8, 16, 32, 48, 64, 96, 128)
SPECS = {"int8 per channel": QuantSpec(kind="int", bits=8, granularity="channel"),
         "int4 g64": QuantSpec(kind="int", bits=4, granularity="group", group_size=64, symmetric=False)}


def median_us(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def build_times() -> list[str]:
    """Per path: compile time into an empty cache, and self-check time."""
    lines = []
    saved = os.environ.get("LOWBIT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOWBIT_CACHE"] = tmp
        try:
            for isa in native.supported_isas():
                t = time.perf_counter()
                native._build(isa)
                built = time.perf_counter() - t
                k = native._open(isa)
                checks = []
                for _ in range(5):
                    t = time.perf_counter()
                    bad = native.selfcheck(k)
                    checks.append(time.perf_counter() - t)
                lines.append(f"| {isa} | {built:.2f} | {statistics.median(checks) * 1e3:.1f} | {bad or 'pass'} |")
        finally:
            if saved is None:
                os.environ.pop("LOWBIT_CACHE", None)
            else:
                os.environ["LOWBIT_CACHE"] = saved
    return lines


def crossover(repeats: int) -> list[str]:
    lines = []
    g = torch.Generator().manual_seed(0)
    for N, K in SHAPES:
        for label, spec in SPECS.items():
            m = QLinear.from_weight(torch.randn(N, K, generator=g) * 0.05, spec)
            plan = m.prepare("auto")
            p = m._packed
            for M in ROWS:
                x = torch.randn(M, K, generator=g)
                nat = median_us(lambda: kernels._native(plan, p, x, N), repeats)
                deq = median_us(lambda: kernels._dequantized_gemm(plan, p, x, N), repeats)
                lines.append(f"| {N} x {K} | {label} | {M} | {nat:.0f} | {deq:.0f} | {deq / nat:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.why_not()}")
    builds = build_times()
    cross = crossover(args.repeats)
    body = ["## Native kernel paths", "",
            f"Written by `benchmarks/native_paths.py` on {time.strftime('%Y-%m-%d')} ({native.cpu_name()}; paths it "
            f"runs: {', '.join(native.supported_isas())}; default {native.isa()}; 2 threads, torch {torch.__version__}).",
            "", "Compiling kernels.c for each path into an empty cache folder (once per machine and source), and its "
            "known-answer self-check (once per process, median of 5):", "",
            "| path | build (s) | self-check (ms) | verdict |", "|---|---|---|---|", *builds, "",
            f"One product on the default path ({native.isa()}), native kernel (activations rounded to int8) against "
            f"the float GEMM on weights dequantized once per call, median of {args.repeats} calls. `kernels.run` uses "
            f"the native kernel below {native.DEQUANT_ROWS} rows:", "",
            "| weight (out x in) | format | rows | native (us) | dequantize + GEMM (us) | GEMM / native |",
            "|---|---|---|---|---|---|", *cross]
    text = "\n".join(body)
    print(text)
    write_section(ROOT / "docs" / "BENCHMARKS.md", "native-paths", text)


if __name__ == "__main__":
    main()
