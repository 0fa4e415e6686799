"""Calibrated quantization of a checkpoint larger than the memory it is allowed, and GPTQ time on the
bundled model.

    .venv/bin/python benchmarks/calib_memory.py capped [--layers 22 --hidden 2048 --intermediate 5632]
        [--cap-gb 2.0] [--limit cgroup|rlimit] [--method gptq] [--samples 8] [--seq-len 256] [--learn-steps 200]
        [--learn-e2e-steps N]
    .venv/bin/python benchmarks/calib_memory.py speed [--model smollm2-135m] [--samples 128] [--seq-len 512]

capped: saves a random-initialised Llama (default about 1.2B parameters, 4.8 GB as FP32 safetensors),
then quantizes it to W4 g128 in a child process held to --cap-gb of memory. --limit cgroup (the
default where /sys/fs/cgroup/memory is writable, as root on cgroup v1) puts the child in a memory
cgroup of that size: resident memory and page cache count, the kernel kills the child past it.
--limit rlimit caps its address space with RLIMIT_AS instead, which also counts every reserved but
unused mapping (thread stacks, library mappings), so it is stricter than its number says
(MALLOC_ARENA_MAX=2 keeps glibc's per-thread arenas from reserving more). The child reports its peak
RSS (VmHWM) and peak address space (VmPeak). Loading the float model whole could not fit under the
cap; the block-by-block loop does.
speed: `lowbit quantize --method gptq` on the bundled model in a child process: wall time, peak RSS.
Each writes its own section of docs/BENCHMARKS.md (capped: "calibrated-capped" for GPTQ,
"calibrated-capped-<method>" for the others, "-e2e<N>" appended with --learn-e2e-steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from presets import write_section  # noqa: E402

CHILD = """
import json, sys, threading, time
sys.path.insert(0, {root!r})
import lowbit
from lowbit.calib import CalibConfig

def rss_kb():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))

phase, peaks = ["calibration data"], {{}}
def report():  # one line per finished phase, flushed, so a killed run still says how far it got
    print(json.dumps({{"phase": phase[0], "peak_rss_kb": peaks.get(phase[0], 0)}}), flush=True)
def progress(msg, i, n):
    name = "blocks" if msg.startswith("block") else "end-to-end scales" if msg.startswith("end-to-end") else msg
    if name != phase[0]:
        report()
        phase[0] = name
def sample():
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss_kb())
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
lowbit.quantize({folder!r}, "w4-g128", out={out!r}, progress=progress,  # as `lowbit quantize` does
                calib=CalibConfig(method={method!r}, data="wikipedia", samples={samples}, seq_len={seq_len},
                                  learn_steps={learn_steps}, learn_e2e_steps={e2e_steps}))
report()
status = {{l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(('VmHWM', 'VmPeak'))}}
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_kb": status["VmHWM"], "peak_vm_kb": status["VmPeak"]}}))
"""


def make_model(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit.model import sources

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(folder, max_shard_size="20GB")
    bundled = sources.resolve("smollm2-135m")  # any byte-level tokenizer will do for random weights
    tok_folder, _ = __import__("lowbit.model.load", fromlist=["float_folder"]).float_folder(bundled)
    AutoTokenizer.from_pretrained(str(tok_folder)).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def cgroup_ok() -> bool:
    return CGROUP_ROOT.is_dir() and os.access(CGROUP_ROOT, os.W_OK)


def limit(kind: str, cap_bytes: int, group: Path | None):
    def pre():
        if kind == "rlimit":
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
        else:
            (group / "cgroup.procs").write_text(str(os.getpid()))
    return pre


def make_group(cap_bytes: int) -> Path:
    group = CGROUP_ROOT / f"lowbit-capped-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():  # no swapping around the cap either
        swap.write_text(str(cap_bytes))
    return group


def capped(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "random-llama"
        t0 = time.perf_counter()
        n = make_model(folder, args.layers, args.hidden, args.intermediate, args.vocab)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"saved {n / 1e9:.2f}B parameters, {size / 1e9:.2f} GB, in {time.perf_counter() - t0:.0f} s", flush=True)
        cap = int(args.cap_gb * 1e9)
        code = CHILD.format(root=str(ROOT), folder=str(folder), method=args.method, samples=args.samples,
                            seq_len=args.seq_len, out=str(Path(tmp) / "w4"), learn_steps=args.learn_steps,
                            e2e_steps=args.learn_e2e_steps)
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "HF_HUB_OFFLINE": "1"}
        kind = args.limit or ("cgroup" if cgroup_ok() else "rlimit")
        group = make_group(cap) if kind == "cgroup" else None
        try:
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               preexec_fn=limit(kind, cap, group), env=env)
            group_peak = int((group / "memory.max_usage_in_bytes").read_text()) if group else None
        finally:
            if group:
                group.rmdir()
        ok = p.returncode == 0
        records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        phases = [r for r in records if "phase" in r]
        res = records[-1] if ok else {}
        print(p.stdout[-2000:], p.stderr[-3000:] if not ok else "", flush=True)
        art = sum(f.stat().st_size for f in (Path(tmp) / "w4").glob("*")) if ok else 0
    lines = [
        "## Calibrated quantization under a memory cap",
        "",
        f"Written by `benchmarks/calib_memory.py capped --layers {args.layers} --hidden {args.hidden} --intermediate "
        f"{args.intermediate} --cap-gb {args.cap_gb} --method {args.method} --samples {args.samples} --seq-len "
        f"{args.seq_len}" + (f" --learn-steps {args.learn_steps}" if args.method == "learned" else "")
        + (f" --learn-e2e-steps {args.learn_e2e_steps}" if args.learn_e2e_steps else "") + f" --limit {kind}` on {time.strftime('%Y-%m-%d')}: a random-initialised Llama of {n / 1e9:.2f}B "
        f"parameters saved as FP32 safetensors ({size / 1e9:.2f} GB), quantized to w4-g128 with {args.method} in a child "
        f"process held to {args.cap_gb} GB: "
        + ("a memory cgroup of that size (resident memory and page cache count; past it the kernel kills the child)."
           if kind == "cgroup" else "RLIMIT_AS, which counts every mapping, so the cap is stricter than a "
           "resident-memory limit of the same size."),
        "",
        "| checkpoint on disk | cap | result | peak RSS | peak address space | peak in the cgroup (with page cache) "
        "| artifact | time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {size / 1e9:.2f} GB | {args.cap_gb:.1f} GB ({kind}) | {'ok' if ok else 'failed (exit %d)' % p.returncode} | "
        + (f"{res['peak_rss_kb'] / 1e6:.2f} GB | {res['peak_vm_kb'] / 1e6:.2f} GB | "
           f"{'-' if group_peak is None else f'{group_peak / 1e9:.2f} GB'} | {art / 1e9:.2f} GB | {res['seconds']:.0f} s |"
           if ok else f"- | - | {'-' if group_peak is None else f'{group_peak / 1e9:.2f} GB'} | - | - |"),
        "",
        "Peak RSS by phase (sampled every 50 ms; a killed run lists the phases it finished): "
        + "; ".join(f"{r['phase']} {r['peak_rss_kb'] / 1e6:.2f} GB" for r in phases) + "."
        if phases else "No phase finished.",
    ]
    # GPTQ keeps the section name it was first recorded under; other methods get their own
    write_section(args.out, "calibrated-capped" + ("" if args.method == "gptq" else f"-{args.method}")
                  + (f"-e2e{args.learn_e2e_steps}" if args.learn_e2e_steps else ""), "\n".join(lines))
    print(f"wrote {args.out}")


def work_tflop(config: dict, tokens: int, seq_len: int) -> dict[str, float]:
    """Floating-point work of GPTQ's calibrated loop as lowbit runs it, from the model's config.
    Per block: the statistics pass runs every Linear but the last (down) projection plus attention,
    the output pass runs the whole quantized block, and each distinct Linear input adds its Hessian
    (2 * in^2 per token as one product, about half that from upper blocks)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads) * hd
    q = heads * hd
    linear = 2 * (h * q + 2 * h * kv + q * h + 2 * h * inter + inter * h)  # flop per token per block
    down = 2 * inter * h
    attention = 2 * 2 * heads * hd * seq_len  # QK^T and AV, flop per token (no causal skipping)
    widths = (h, q, h, inter)  # inputs of q/k/v, o, gate/up, down

    def upper_share(w: int) -> float:  # share of the product lowbit.calib.gptq.Hessian computes
        k = max(1, w // 256)
        return (k * (k + 1) / 2) / (k * k)

    per_token = {"statistics pass": linear - down + attention, "output pass": linear + attention,
                 "Hessians": sum(2 * w * w * upper_share(w) for w in widths)}
    return {k: v * tokens * layers / 1e12 for k, v in per_token.items()}


def gemm_gflops(m: int = 512, k: int = 1536, n: int = 576, seconds: float = 3.0) -> float:
    """fp32 matrix-product rate on this machine now, at a shape the loop runs (tokens x in -> out)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(10):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - t0) / 1e9


def speed(args) -> None:
    from lowbit.model import sources
    from lowbit.model.load import float_folder

    import torch

    config = json.loads((float_folder(sources.resolve(args.model))[0] / "config.json").read_text())
    config = config.get("text_config", config)
    rate, torch_threads = gemm_gflops(), torch.get_num_threads()
    work = work_tflop(config, args.samples * args.seq_len, args.seq_len)
    total = sum(work.values())
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", "--model", args.model, "--recipe", "w4-g128",
               "--method", "gptq", "--calib", "mix", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--out", str(Path(tmp) / "out")]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # GB (ru_maxrss is in KB)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        cal = json.loads((Path(tmp) / "out" / "lowbit.json").read_text())["calibration"]
    lines = [
        f"## GPTQ time and memory on {args.model}",
        "",
        f"Written by `benchmarks/calib_memory.py speed --model {args.model} --samples {args.samples} --seq-len "
        f"{args.seq_len}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs of a shared machine; "
        f"other load is not controlled): `lowbit quantize --recipe w4-g128 --method gptq` in a child process.",
        "",
        "| calibration | wall time (whole command) | of which calibrated loop | peak RSS |",
        "|---|---|---|---|",
        f"| {args.samples} x {args.seq_len} tokens | {wall:.0f} s | {cal['seconds']:.0f} s | {peak:.2f} GB |",
        "",
        "The work this takes, counted from the model's config: "
        + ", ".join(f"{k} {v:.1f} TFLOP" for k, v in work.items())
        + f", {total:.1f} TFLOP in all. fp32 matrix products ran at {rate:.0f} GFLOP/s in this run (512 x 1536 "
        f"by 1536 x 576, {torch_threads} threads), so the loop's floating-point work alone needs {total * 1e3 / rate:.0f} s "
        f"at that rate; finishing in 180 s would take {total * 1e3 / 180:.0f} GFLOP/s.",
    ]
    write_section(args.out, f"calibrated-speed-{args.model}", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capped")
    c.add_argument("--layers", type=int, default=22)
    c.add_argument("--hidden", type=int, default=2048)
    c.add_argument("--intermediate", type=int, default=5632)
    c.add_argument("--vocab", type=int, default=49152)  # the bundled tokenizer's
    c.add_argument("--cap-gb", type=float, default=2.0)
    c.add_argument("--limit", choices=("cgroup", "rlimit"), default=None,
                   help="how the cap is held (default: cgroup where /sys/fs/cgroup/memory is writable, else rlimit)")
    c.add_argument("--method", default="gptq")
    c.add_argument("--samples", type=int, default=8)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--learn-steps", type=int, default=200,
                   help="--method learned: steps per block (memory does not grow with them; time does)")
    c.add_argument("--learn-e2e-steps", type=int, default=0,
                   help="--method learned: then that many end-to-end scale steps (0: off)")
    c.add_argument("--tmp", default=None, help="folder for the temporary checkpoint (needs its size free)")
    s = sub.add_parser("speed")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--samples", type=int, default=128)
    s.add_argument("--seq-len", type=int, default=512)
    for p in (c, s):
        p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    capped(args) if args.cmd == "capped" else speed(args)


if __name__ == "__main__":
    main()
