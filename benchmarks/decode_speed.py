"""Prefill and decode speed of lowbit's CPU kernels against FP32, BF16 and llama.cpp, one run, side by side.

    .venv/bin/python benchmarks/decode_speed.py [--model smollm2-135m] [--rounds 3] [--no-llamacpp] [--kv]

For each format, in memory: prefill tokens/s (a --prompt-tokens prompt) and decode tokens/s (--new-tokens
greedy tokens after it), at batch 1 and batch 8, 2 threads. Every round runs every row once, in an order
rotated each round, and the table keeps each row's median over rounds, so slow moments of a shared
machine hit all rows alike. Ratios are to FP32 from the same run.

llama.cpp rows: the F32 GGUF of the same FP32 baseline and llama.cpp's own Q8_0 / Q4_0 / Q4_K_M of it,
run through llama-cpp-python (one sequence: its Python API has no batched generation, so batch 8 is
lowbit only).

Bandwidth: bytes of weights read per decoded token (every matmul weight once, the output head
included) x decode tokens/s, against this machine's read bandwidth measured in the same run
(torch.sum over 1 GiB, 2 threads).

--kv adds the KV-cache check: mean KL divergence of next-token distributions with an INT8 (and FP8)
KV cache against the float cache, over one window of the model's full context (the FP32 model, the
same Wikipedia tokens for both).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.data.corpora import wikipedia_text  # noqa: E402
from lowbit.runtime.generate import pick_engine  # noqa: E402
from lowbit.model import sources  # noqa: E402
from lowbit.model.load import float_folder, load_model  # noqa: E402
from lowbit.model.skeleton import load_tokenizer  # noqa: E402
from lowbit import native  # noqa: E402
from lowbit.model.qlinear import QLinear, kernel_summary  # noqa: E402
from benchmarks.presets import write_section  # noqa: E402

# where the bundled checkpoints' weights came from (speed is unaffected; quality rows are)
SOURCE_GRID = {"smollm2-135m": "The bundled SmolLM2's weights sit on a Q4_1 grid, which changes nothing here but quality.",
               "gemma3-270m": "Gemma-3-270M's weights were shipped mostly on a Q5_0 grid, which changes nothing here but quality."}
LOWBIT_ROWS = ("fp32", "bf16", "int8", "w4-g128", "w8a8-dynamic")
PATH_ROWS = ("int8", "w4-g128")  # also run on every lower native path, and on torch's kernels alone
TORCH_OF = {"fp32": "fp32", "int8": "int8 torch", "w4-g128": "w4-g128 torch"}
LLAMA_ROWS = ("F32", "Q8_0", "Q4_0", "Q4_K_M")


def cpu_name() -> str:
    """CPU model, the vector level torch dispatches to, and lowbit's native path (speed depends on all three)."""
    from lowbit.model.kernels import REDUCE_RANGE

    return (f"{native.cpu_name()}, instruction-set paths it runs: {', '.join(native.supported_isas())}; "
            f"default native path {native.isa() or 'none'}; torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, " + ("no VNNI (int8dyn keeps 7-bit activations)" if REDUCE_RANGE else "VNNI"))


def read_bandwidth() -> float:
    """GB/s of torch.sum over 1 GiB of fp32 (median of 5)."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def matmul_bytes(model) -> int:
    """Bytes of every matmul weight read once per decoded token (QLinear kernel tensors, float Linears)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QLinear):
            total += m.memory_bytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def lowbit_model(name: str, row: str):
    if row.endswith(" torch"):  # quantized as `row`, its modules packed for torch's kernels (LOWBIT_NATIVE=0)
        from lowbit.model.qlinear import prepare_model

        model = lowbit_model(name, row.split()[0])
        with native.disabled():
            prepare_model(model, warn=False)
        return model
    if row == "bf16":
        return load_model(name, dtype=torch.bfloat16).module
    model = load_model(name).module
    if row != "fp32":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowbit.quantize(model, row)
    return model


@torch.inference_mode()
def time_lowbit(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for a (batch, T) prompt."""
    from lowbit.runtime.decode import LeanDecoder, decoding

    B, T = prompt.shape
    if pick_engine(model) == "lean":  # what lean_generate does: prefill, then steps inside decoding()
        dec = LeanDecoder(model, B, T + new_tokens + 1)
        t0 = time.perf_counter()
        logits = dec.prefill(prompt)
        t1 = time.perf_counter()
        nxt = logits.argmax(-1, keepdim=True)
        with decoding(dec):
            for _ in range(new_tokens - 1):
                nxt = dec.step(nxt).argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    else:  # transformers' forward with its dynamic cache
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        t1 = time.perf_counter()
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return B * T / (t1 - t0), B * (new_tokens - 1) / (t2 - t1)


@torch.inference_mode()
def native_divergence(models: dict, text_ids: list[int], prompt: int = 128, steps: int = 128) -> dict:
    """What the native path costs in quality: teacher-forced decode steps over Wikipedia, each quantized
    row once through lowbit's native code (int8 activations in blocks of 32) and once through torch's
    kernels (bf16 activations), both against the FP32 model. Mean KLD and top-1 agreement."""
    from lowbit.runtime.decode import LeanDecoder, decoding

    ids = torch.tensor([text_ids[:prompt + steps]])

    def run(row: str, use_native: bool) -> tuple[torch.Tensor, bool]:
        # without native code: the same quantized weights, packed for torch's kernels
        model = models[row] if use_native else models[TORCH_OF[row]]
        with native.disabled() if not use_native else contextlib.nullcontext():
            dec = LeanDecoder(model, 1, prompt + steps + 1)
            out = [dec.prefill(ids[:, :prompt])]
            with decoding(dec):
                for i in range(prompt, prompt + steps - 1):
                    out.append(dec.step(ids[:, i:i + 1]))
        return torch.cat(out).float().log_softmax(-1), dec.native is not None

    base, _ = run("fp32", False)
    res = {}
    for row in ("int8", "w4-g128"):
        for use in (True, False):
            lq, used = run(row, use)
            res[(row, use)] = {"kld": (base.exp() * (base - lq)).sum(-1).mean().item(),
                               "top1": (base.argmax(-1) == lq.argmax(-1)).float().mean().item(), "native_step": used}
    return {"steps": steps, "prompt": prompt, "rows": res}


def engine_of(model, batch: int) -> str:
    """Which loop a row's decode steps ran in."""
    from lowbit.runtime.decode import LeanDecoder, uses_native_kernels

    if pick_engine(model) != "lean":
        return "hf loop"
    if LeanDecoder(model, batch, 8).native is not None:
        return "native step"
    small = uses_native_kernels(model)
    return "lean loop" + (f" (native kernels below {native.DEQUANT_ROWS} rows)" if small else "")


class LlamaRow:
    def __init__(self, path: Path, n_ctx: int) -> None:
        from lowbit.exporters.llamacpp import open_llama

        self.path = path
        self.llm = open_llama(path, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)

    def time(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        import numpy as np

        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (new_tokens - 1) / (t2 - t1)

    def weight_bytes(self) -> int:
        """Bytes read per token: every tensor but the embedding table, unless the head reuses it."""
        from gguf import GGUFReader

        r = GGUFReader(str(self.path))
        sizes = {t.name: int(t.n_bytes) for t in r.tensors}
        tied = "output.weight" not in sizes
        return sum(v for k, v in sizes.items() if k != "token_embd.weight" or tied)


@torch.inference_mode()
def kv_divergence(name: str, kinds=("int8", "fp8")) -> dict:
    """Mean KL(float cache || quantized cache) over one window of the full context."""
    from lowbit.model.kvcache import QuantizedKVCache

    loaded = load_model(name)
    model, tok = loaded.module, loaded.tokenizer
    ctx = min(int(getattr(model.config, "max_position_embeddings", 2048)), 8192)  # SmolLM2: its full 8192
    ids = tok(wikipedia_text(max_chars=ctx * 8), return_tensors="pt", add_special_tokens=False).input_ids[:, :ctx]
    ctx = ids.shape[1]
    base_h = model.model(ids).last_hidden_state[0]
    out = {"context": ctx}
    for kind in kinds:
        h = model.model(ids, cache=QuantizedKVCache(kind, model.config), use_cache=True).last_hidden_state[0]
        kld = agree = 0.0
        for i in range(0, ctx - 1, 512):  # the head in chunks: ctx x vocab logits at once would be GBs
            lb = model.lm_head(base_h[i:min(i + 512, ctx - 1)]).float().log_softmax(-1)
            lq = model.lm_head(h[i:min(i + 512, ctx - 1)]).float().log_softmax(-1)
            kld += (lb.exp() * (lb - lq)).sum().item()
            agree += (lb.argmax(-1) == lq.argmax(-1)).sum().item()
        out[kind] = {"kld": kld / (ctx - 1), "top1": agree / (ctx - 1)}
    # the evaluation harness's long-context suite (perplexity by position, needle retrieval) with the
    # candidate reading an INT8 KV cache, against the same model with a float cache
    import copy

    from lowbit.eval.suites.text import long_context
    from lowbit.model.handle import Model
    from lowbit.model.kvcache import attach

    cand = Model(copy.deepcopy(model), tok, loaded.source, loaded.folder)
    attach(cand.module, "int8")
    res = long_context(loaded, cand)
    out["long_context"] = {"metrics": res.metrics, "n": res.n}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--kv", action="store_true", help="also measure KV-cache INT8/FP8 divergence at full context")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    print(f"loading {len(LOWBIT_ROWS)} lowbit variants of {args.model}", flush=True)
    models = {row: lowbit_model(args.model, row) for row in (*LOWBIT_ROWS, *(TORCH_OF[r] for r in PATH_ROWS))}
    tok = load_tokenizer(float_folder(sources.resolve(args.model))[0])
    text_ids = tok(wikipedia_text(max_chars=40_000), add_special_tokens=False)["input_ids"]
    P, N = args.prompt_tokens, args.new_tokens
    prompts = {1: torch.tensor([text_ids[:P]]), 8: torch.tensor([text_ids[i * P:(i + 1) * P] for i in range(8)])}
    llama = {}
    if not args.no_llamacpp:
        from lowbit.exporters import llamacpp

        for t in LLAMA_ROWS:
            path = llamacpp.baseline_gguf(args.model) if t == "F32" else llamacpp.llama_quantized(args.model, t)
            llama[t] = LlamaRow(path, P + N + 8)
    bw = read_bandwidth()
    lower = native.supported_isas()[1:] if native.available() else []  # the paths below the default one
    rows = ([("lowbit", r, b) for r in LOWBIT_ROWS for b in (1, 8)]
            + [("lowbit", f"{r} [{isa}]", 1) for r in PATH_ROWS for isa in lower]
            + [("lowbit", TORCH_OF[r], 1) for r in PATH_ROWS] + [("llama.cpp", t, 1) for t in llama])
    results: dict = {k: [] for k in rows}
    for rnd in range(args.rounds):
        order = rows[rnd % len(rows):] + rows[:rnd % len(rows)]
        for key in order:
            who, name, b = key
            if who == "lowbit" and name.endswith("]"):  # a forced lower path
                with native.using(name.split("[")[1][:-1]):
                    results[key].append(time_lowbit(models[name.split()[0]], prompts[b], N))
            elif who == "lowbit" and name.endswith(" torch"):
                with native.disabled():
                    results[key].append(time_lowbit(models[name], prompts[b], N))
            elif who == "lowbit":
                results[key].append(time_lowbit(models[name], prompts[b], N))
            else:
                results[key].append(llama[name].time(prompts[1][0].tolist(), N))
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    bw_after = read_bandwidth()
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)) for k, vals in results.items()}
    fp = {b: med[("lowbit", "fp32", b)] for b in (1, 8)}
    lines = []
    for key in rows:
        who, name, b = key
        pre, dec = med[key]
        if who == "lowbit":
            model = models[name.split(" [")[0]]
            nbytes = matmul_bytes(model)
            kernels = kernel_summary({n: m.plan for n, m in model.named_modules() if isinstance(m, QLinear) and m.plan})
            if name.endswith(" torch"):
                with native.disabled():
                    loop = engine_of(model, b)
                path = "torch's kernels (LOWBIT_NATIVE=0)"
            elif name.endswith("]"):
                isa = name.split("[")[1][:-1]
                with native.using(isa):
                    loop = engine_of(model, b)
                path = f"native {isa} (forced)"
            else:
                loop, path = engine_of(model, b), f"native {native.isa()}" if native.available() else "no native code"
            how = (", ".join(sorted(kernels)) or ("bf16 F.linear" if name == "bf16" else "fp32 F.linear")) + \
                f"; {loop}; {path}"
        else:
            from lowbit.exporters.llamacpp import weight_buffers

            nbytes, how = llama[name].weight_bytes(), f"llama-cpp-python 0.3.36, {weight_buffers()} weight buffers"
        gbs = nbytes * dec / 1e9 if b == 1 else None
        lines.append(f"| {who} {name} | {b} | {pre:.0f} | {pre / fp[b][0]:.2f}x | {dec:.1f} | {dec / fp[b][1]:.2f}x | "
                     f"{nbytes / 1e6:.0f} | " + (f"{gbs:.1f} ({gbs / bw:.0%})" if gbs else "-") + f" | {how} |")
    best = {n: med[("lowbit", n, 1)][1] for n in LOWBIT_ROWS}
    goals = []
    if llama:
        for mine, theirs in (("int8", "Q8_0"), ("w4-g128", "Q4_0")):
            goals.append(f"- {mine} on the default path ({native.isa() or 'none'}): {best[mine] / best['fp32']:.2f}x FP32 "
                         f"decode, {best[mine] / med[('llama.cpp', theirs, 1)][1]:.0%} of llama.cpp {theirs} (goal >= 100%)")
    body = [f"## Decode and prefill speed ({args.model})", "",
            f"Written by `benchmarks/decode_speed.py --model {args.model}` on {time.strftime('%Y-%m-%d')} "
            f"({cpu_name()}; 2 threads, torch {torch.__version__}): prompt {P} tokens of Wikipedia, "
            f"{N} greedy new tokens, median of {args.rounds} rounds, every row once per round in rotated order. "
            f"Ratios are to lowbit FP32 at the same batch size, from the same run. Read bandwidth of this machine, "
            f"measured in the run: {bw:.1f} GB/s before, {bw_after:.1f} GB/s after (torch.sum over 1 GiB).", "",
            "| runtime / format | batch | prefill tok/s | vs FP32 | decode tok/s | vs FP32 | weights read per token (MB) "
            "| achieved GB/s (share of read bandwidth) | kernels; loop |",
            "|---|---|---|---|---|---|---|---|---|", *lines, ""]
    if goals:
        body += ["Goals (batch-1 decode, llama.cpp built with GGML_NATIVE on this CPU):", *goals, ""]
    body += ["Notes: quantized rows are the presets quantized in memory (the same tensors a saved artifact "
             "reloads); their modules hold lowbit's own q4 / q8 layouts (lowbit/native/layout.py), or torch's int4pack "
             "in the rows marked 'torch'. 'native step': a whole batch-1 decode step in lowbit's native code "
             "(lowbit/native/kernels.c, built per instruction set: activations rounded to int8 in blocks of 32, as "
             "llama.cpp does for Q8_0 / Q4_0; float32 weights for FP32). Rows marked [path] force a lower "
             "instruction-set path on this CPU (native.using, as LOWBIT_ISA does); 'torch' rows run with native code "
             "off (as LOWBIT_NATIVE=0), on torch's int4pack / int8pack kernels with bf16 activations. Prefill, and "
             f"batch 8, run the lean loop (static KV cache, torch ops); there, products of fewer than "
             f"{native.DEQUANT_ROWS} rows go to the native int4/int8 products, from {native.DEQUANT_ROWS} rows on "
             "the weights are dequantized to float once per call for one float GEMM; int8dyn is PyTorch's "
             "quantized linear (fbgemm/oneDNN) on per-token-scaled int8 activations. bf16 is the whole model cast "
             "to bf16. Models the lean loop does not cover run transformers' forward with its dynamic cache ('hf loop'). "
             f"{SOURCE_GRID.get(args.model, '')}"]
    nd = native_divergence(models, text_ids)
    body += ["", f"What the native path costs in quality ({nd['steps']} teacher-forced decode steps after a "
             f"{nd['prompt']}-token Wikipedia prompt, against the FP32 model's next-token distributions):", "",
             "| format | path | mean KLD vs FP32 | top-1 agreement |", "|---|---|---|---|"]
    for (row, use), r in nd["rows"].items():
        path = ("native step" if r["native_step"] else "lean loop, native kernels") if use else "torch kernels (bf16 activations)"
        body.append(f"| {row} | {path} | {r['kld']:.4f} | {r['top1']:.1%} |")
    text = "\n".join(body)
    print(text)
    write_section(ROOT / "docs" / "BENCHMARKS.md", f"decode-speed-{args.model}", text)
    if args.kv:  # a section of its own, so a speed-only rerun leaves it as measured
        kv = kv_divergence(args.model)
        body = [f"## KV-cache quantization ({args.model})", "",
                f"Written by `benchmarks/decode_speed.py --model {args.model} --kv` on {time.strftime('%Y-%m-%d')}.",
                "", f"KV-cache quantization at full context ({kv['context']} tokens, FP32 weights, one Wikipedia "
                 f"window, mean over every position):", "", "| KV cache | mean KLD vs float cache | top-1 agreement | bytes per token-head |",
                 "|---|---|---|---|"]
        head_dim = getattr(models["fp32"].config, "head_dim", None) or models["fp32"].config.hidden_size // models["fp32"].config.num_attention_heads
        body += [f"| float (fp32) | 0 | 100% | {4 * head_dim} |"]
        body += [f"| {k} | {kv[k]['kld']:.5f} | {kv[k]['top1']:.2%} | {head_dim + 4} |" for k in ("int8", "fp8")]
        lc = kv["long_context"]
        body += ["", "Goal: INT8 KV adds <= 0.01 mean KLD at full context.", "",
                 f"The long-context suite of `lowbit eval` ({lc['n']} tokens, FP32 weights, float KV vs INT8 KV):", "",
                 "| metric | float KV | INT8 KV |", "|---|---|---|"]
        body += [f"| {k} | {v['baseline']:.3f} | {v['candidate']:.3f} |" for k, v in lc["metrics"].items()]
        text = "\n".join(body)
        print(text)
        write_section(ROOT / "docs" / "BENCHMARKS.md", f"kv-cache-{args.model}", text)


if __name__ == "__main__":
    main()
