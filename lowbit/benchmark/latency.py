"""Latency, throughput and memory of a candidate model against its baseline (`lowbit bench`).

Method, and why:
- Both models get the same prompts (slices of real text, lengths spread around prompt_tokens), and
  are measured alternately, request by request, with the order flipped every request, so that slow
  moments of the machine (other processes, thermal limits) hit both models alike.
- Decoding is greedy with exactly output_tokens new tokens (min_new_tokens = max_new_tokens), so
  the two models do the same amount of work and tokens/s compare.
- Time to first token comes from a streamer passed to generate: its first put() carries the prompt,
  the second the first new token.
- Peak RSS of two models in one process is meaningless (the second inherits the first's peak), so
  each model's peak is measured in a fresh subprocess, next to the floor of the same subprocess
  with no model loaded (interpreter + torch + transformers imports).

Everything time-based uses time.perf_counter(); torch.set_num_threads is the caller's business.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.handle import Model, weight_bytes

Progress = Callable[[str, int, int], None]  # (what, done, total)

# Used by peak_rss_subprocess when no text is given: only the prompt's length matters for memory.
FILLER = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 128  # the mean prompt length
    output_tokens: int = 32  # new tokens per sequence, always exactly this many
    batch_size: int = 1  # sequences per request (left-padded into one generate call)
    concurrency: int = 1  # requests in flight at once (thread pool)
    requests: int = 12  # measured requests per model
    warmup: int = 2  # requests per model run first and not measured
    prompt_spread: float = 0.5  # prompt lengths are uniform in prompt_tokens * [1 - spread, 1 + spread]
    seed: int = 0
    engine: str = "auto"  # "lean" decode loop where the architecture allows, else "hf" generate
    kv_cache: str = "none"  # none, int8, fp8

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens", "batch_size", "concurrency", "requests"):
            if getattr(self, name) < 1:
                raise LowbitError(f"bench option '{name}': must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise LowbitError(f"bench option 'warmup': must be 0 or more, got {self.warmup}")
        if not 0 <= self.prompt_spread < 1:
            raise LowbitError(f"bench option 'prompt_spread': must be in [0, 1), got {self.prompt_spread}")
        from lowbit.runtime.generate import ENGINES
        from lowbit.model.kvcache import check_kind

        if self.engine not in ENGINES:
            raise LowbitError(f"bench option 'engine': '{self.engine}' is unknown; use one of {', '.join(ENGINES)}")
        check_kind(self.kv_cache, "bench option 'kv_cache'")

    @classmethod
    def quick(cls, **overrides) -> "BenchConfig":
        """The --quick setting: fewer requests."""
        return cls(**{"requests": 4, **overrides})

    @property
    def max_prompt_tokens(self) -> int:
        return max(1, math.ceil(self.prompt_tokens * (1 + self.prompt_spread)))


# -- prompts -----------------------------------------------------------------------------------------
def prompt_lengths(config: BenchConfig, n: int) -> list[int]:
    """n deterministic prompt lengths spread around config.prompt_tokens."""
    rng = random.Random(config.seed)
    lo = max(1, math.floor(config.prompt_tokens * (1 - config.prompt_spread)))
    return [rng.randint(lo, config.max_prompt_tokens) for _ in range(n)]


def text_tokens(tokenizer, text: str, needed: int) -> list[int]:
    """Exactly `needed` token ids of `text` (repeated if the text is short)."""
    if not text.strip():
        raise LowbitError("bench text: is empty; fix: pass real text (e.g. lowbit.data.corpora.wikipedia_text())")
    # Tokenizing 200k characters is slow for nothing; 8 characters per token is generous for any tokenizer.
    ids = tokenizer(text[: needed * 8], add_special_tokens=False)["input_ids"]
    if not ids:
        raise LowbitError("bench text: the tokenizer produced no tokens from it; fix: pass real text")
    return (ids * (needed // len(ids) + 1))[:needed]


def make_requests(tokenizer, text: str, config: BenchConfig, n: int) -> list[list[list[int]]]:
    """n requests, each batch_size prompts (token ids): consecutive slices of the text, so all differ."""
    lengths = prompt_lengths(config, n * config.batch_size)
    ids = text_tokens(tokenizer, text, sum(lengths))
    prompts, start = [], 0
    for length in lengths:
        prompts.append(ids[start:start + length])
        start += length
    return [prompts[i:i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else pid


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the left so every sequence's next token is at the end.

    Done here rather than with tokenizer.padding_side = "left" so the caller's tokenizer is not changed.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# -- one request -------------------------------------------------------------------------------------
class _FirstTokenClock:
    """A generate streamer that only notes when the first new token arrives."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put() carries the prompt; the second, the first new token
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def timed_request(model: nn.Module, prompts: list[list[int]], new_tokens: int, pad: int, engine: str = "auto",
                  kv_cache: str = "none") -> dict:
    """Run one greedy request; returns its timings (seconds) and token counts."""
    from lowbit.runtime.generate import pick_engine

    ids, mask = left_pad(prompts, pad)
    clock = _FirstTokenClock()
    with torch.inference_mode():  # grad mode is per thread: set it inside the worker
        if pick_engine(model, engine) == "lean":
            from lowbit.runtime.decode import lean_generate

            clock.puts = 1  # the lean loop hands over new tokens only
            t0 = time.perf_counter()
            out = lean_generate(model, ids, new_tokens, attention_mask=None if bool(mask.all()) else mask,
                                kv_cache=kv_cache, on_token=clock.put)
            total = time.perf_counter() - t0
            generated = out.shape[1]
        else:
            from lowbit.model.kvcache import QuantizedKVCache

            extra = {} if kv_cache == "none" else {"cache": QuantizedKVCache(kv_cache, model.config)}
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                 streamer=clock, **extra)
            total = time.perf_counter() - t0
            generated = out.shape[1] - ids.shape[1]
    ttft = (clock.first if clock.first is not None else t0 + total) - t0
    return {"ttft_s": ttft, "total_s": total, "sequences": len(prompts), "new_tokens": generated,
            "prompt_tokens": sum(len(p) for p in prompts)}


def run_wave(model: nn.Module, wave: list[list[list[int]]], config: BenchConfig, pad: int,
             pool: ThreadPoolExecutor | None) -> tuple[list[dict], float]:
    """Run a wave of requests (concurrently when there is a pool); returns their results and the wall time."""
    t0 = time.perf_counter()
    if pool is None or len(wave) == 1:
        results = [timed_request(model, r, config.output_tokens, pad, config.engine, config.kv_cache) for r in wave]
    else:
        results = list(pool.map(lambda r: timed_request(model, r, config.output_tokens, pad, config.engine,
                                                        config.kv_cache), wave))
    return results, time.perf_counter() - t0


# -- statistics ----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so p50 <= p95 <= p99 always."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def summarize(results: list[dict], wall_s: float) -> dict:
    """The stats of one model from its measured requests."""
    lat = [r["total_s"] * 1000 for r in results]
    ttft = [r["ttft_s"] * 1000 for r in results]
    generated = sum(r["new_tokens"] * r["sequences"] for r in results)
    # The first new token belongs to prefill (it comes out of the prompt's forward pass), the rest to decode.
    decode_tokens = sum(max(r["new_tokens"] - 1, 0) * r["sequences"] for r in results)
    decode_s = sum(r["total_s"] - r["ttft_s"] for r in results)
    return {
        "prefill_tok_s": _rate(sum(r["prompt_tokens"] for r in results), sum(r["ttft_s"] for r in results)),
        "decode_tok_s": _rate(decode_tokens, decode_s),
        "throughput_tok_s": _rate(generated, wall_s),  # all new tokens over wall time: counts concurrency
        "ttft_ms": {f"p{q}": percentile(ttft, q) for q in (50, 95, 99)},
        "latency_ms": {**{f"p{q}": percentile(lat, q) for q in (50, 95, 99)}, "mean": sum(lat) / len(lat)},
        "latencies_ms": lat,
        "tokens_generated": generated,
    }


def _ratio(cand: float | None, base: float | None) -> float | None:
    return cand / base if cand is not None and base else None


def _reduction_pct(cand: float | None, base: float | None) -> float | None:
    r = _ratio(cand, base)
    return None if r is None else 100 * (1 - r)


def ratios(base: dict, cand: dict) -> dict:
    """Candidate over baseline, computed from the two stats dicts only."""
    b95, c95 = base["latency_ms"]["p95"], cand["latency_ms"]["p95"]
    return {
        "decode_tok_s": _ratio(cand["decode_tok_s"], base["decode_tok_s"]),
        "prefill_tok_s": _ratio(cand["prefill_tok_s"], base["prefill_tok_s"]),
        "p95_latency": _ratio(c95, b95),
        "weight_bytes": _ratio(cand["weight_bytes"], base["weight_bytes"]),
        "peak_rss": _ratio(cand["peak_rss_bytes"], base["peak_rss_bytes"]),
        "p95_improvement_pct": _reduction_pct(c95, b95),
        "memory_reduction_pct": _reduction_pct(cand["weight_bytes"], base["weight_bytes"]),
    }


# -- the benchmark ---------------------------------------------------------------------------------
def check_fits(loaded: Model, config: BenchConfig) -> None:
    from lowbit.runtime.generate import context_length

    limit = context_length(loaded.module.config)
    need = config.max_prompt_tokens + config.output_tokens
    if limit is not None and need > limit:
        raise LowbitError(f"bench options: prompts up to {config.max_prompt_tokens} tokens plus "
                          f"{config.output_tokens} new tokens exceed the model's context ({limit}); "
                          f"fix: lower prompt_tokens or output_tokens")


def bench_pair(baseline: Model, candidate: Model, text: str, config: BenchConfig, progress: Progress | None = None,
               measure_rss: bool = True) -> dict:
    """Measure both models on the same prompts; returns the run dict's "bench" value."""
    loaded = {"baseline": baseline, "candidate": candidate}
    for ld in loaded.values():
        check_fits(ld, config)
    # One tokenization for both, so both models see exactly the same token ids.
    requests = make_requests(baseline.tokenizer, text, config, config.warmup + config.requests)
    results, wall = measure(loaded, requests, config, progress)
    stats = {side: {"weight_bytes": weight_bytes(ld.module), **summarize(results[side], wall[side])}
             for side, ld in loaded.items()}
    add_rss(stats, loaded, text, config, measure_rss, progress)
    return {"config": asdict(config), "baseline": stats["baseline"], "candidate": stats["candidate"],
            "ratios": ratios(stats["baseline"], stats["candidate"])}


def measure(loaded: dict[str, Model], requests: list, config: BenchConfig,
            progress: Progress | None) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Run the requests on both models alternately, wave by wave (a wave: `concurrency` requests at once),
    the order flipped every wave; the first config.warmup requests are run but not recorded."""
    c, w = config.concurrency, config.warmup
    # Warm-up requests form waves of their own, so no measured request shares a wave with one.
    warm_waves = [requests[i:min(i + c, w)] for i in range(0, w, c)]
    waves = warm_waves + [requests[i:i + c] for i in range(w, len(requests), c)]
    results = {side: [] for side in loaded}
    wall = {side: 0.0 for side in loaded}
    pool = ThreadPoolExecutor(max_workers=c) if c > 1 else None
    try:
        for i, wave in enumerate(waves):
            order = ("baseline", "candidate") if i % 2 == 0 else ("candidate", "baseline")
            for side in order:
                res, secs = run_wave(loaded[side].module, wave, config, pad_id(loaded[side].tokenizer), pool)
                if i >= len(warm_waves):
                    results[side].extend(res)
                    wall[side] += secs
            if progress:
                progress("bench requests", i + 1, len(waves))
    finally:
        if pool is not None:
            pool.shutdown()
    return results, wall


def add_rss(stats: dict, loaded: dict[str, Model], text: str, config: BenchConfig, measure: bool,
            progress: Progress | None) -> None:
    """Fill peak_rss_bytes and rss_floor_bytes of each side (None when not measured)."""
    floor = peak_rss_subprocess(None, config) if measure else None
    for i, (side, ld) in enumerate(loaded.items()):
        peak = None
        if measure:
            path, recipe = rss_target(ld)
            peak = peak_rss_subprocess(path, config, text=text, recipe=recipe)
            if progress:
                progress("peak memory (subprocess)", i + 1, len(loaded))
        stats[side].update(peak_rss_bytes=peak, rss_floor_bytes=floor)


def rss_target(loaded: Model) -> tuple[str, dict | None]:
    """What a fresh process loads to rebuild this model: (path for load_model, recipe to apply or None)."""
    if loaded.meta:  # a lowbit artifact: its own folder (source["path"] names the float original)
        return str(loaded.folder), None
    recipe = loaded.recipe  # quantized in memory: load the float model, quantize
    return str(loaded.source["path"]), None if recipe is None else recipe.to_dict()


# -- peak memory in a fresh process -----------------------------------------------------------------
def rss_now_bytes() -> int:
    """This process's resident memory now (VmRSS; the peak where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return max_rss_bytes()


def max_rss_bytes() -> int:
    """This process's peak RSS in bytes.

    On Linux, ru_maxrss survives exec: a child started by subprocess (vfork + exec) reports at least
    the parent's peak, which here holds two models. VmHWM is the peak of the child's own address
    space, so it is read first; ru_maxrss is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  12345 kB"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports kilobytes, macOS bytes


def _rss_proc(model_path: str | None, config: BenchConfig, text: str = "", recipe: dict | None = None,
              nice: int = 0):
    # the caller's thread count: what a process holds depends on it (a one-thread child measured the float
    # model 50 MB closer to a 4-bit one than a two-thread child did)
    job = {"path": model_path, "recipe": recipe, "config": asdict(config), "text": text[:20_000],
           "threads": torch.get_num_threads(), "nice": nice}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so the child imports this lowbit even if not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "from lowbit.benchmark.latency import _rss_child; _rss_child()"
    # The job goes in now and stdin is closed, so the child works while the caller does other things
    # (HeldMemory); its stderr (progress bars, warnings) goes to a file, which never fills as a pipe would.
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env)
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
    except OSError:  # the child died at start: result() reports its exit status and stderr
        pass
    return proc, err


def _rss_result(model_path: str | None, proc, err_file) -> dict:
    out = proc.stdout.read()  # stdin was closed at the start (_rss_proc); stderr is a file
    proc.stdout.close()
    proc.wait()
    err_file.seek(0)
    err = err_file.read()
    err_file.close()
    if proc.returncode != 0:
        raise LowbitError(f"memory of model '{model_path}': the measuring subprocess failed "
                          f"(exit {proc.returncode}): {err.strip()[-800:]}")
    return {k: int(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def process_memory(model_path: str | None, config: BenchConfig, text: str = "", recipe: dict | None = None) -> dict:
    """Memory of a fresh Python that loads model_path, applies recipe (if any) and runs one request of the
    longest prompt length: peak_rss_bytes (its high-water mark) and rss_bytes (resident after the request,
    what a serving process goes on holding). model_path None: the floor (the same imports, nothing loaded)."""
    return _rss_result(model_path, *_rss_proc(model_path, config, text, recipe))


def peak_rss_subprocess(model_path: str | None, config: BenchConfig, text: str = "", recipe: dict | None = None) -> int:
    """Peak RSS (bytes) of process_memory's fresh process."""
    return process_memory(model_path, config, text, recipe)["peak_rss_bytes"]


class HeldMemory:
    """process_memory of both models, their two fresh processes started at once and left to run (memory
    does not depend on timing, so other work may go on meanwhile; not a latency benchmark); result()
    waits for them: {"baseline": {...}, "candidate": {...}}. A model quantized in memory is saved as an
    artifact in a temporary folder first, and its process loads that, as a deployment would (rebuilding
    it from the float model in the child would leave the float weights' pages with the allocator)."""

    def __init__(self, baseline: Model, candidate: Model, text: str, config: BenchConfig,
                 known: dict | None = None) -> None:
        """known: sides already measured (the baseline's, from the cache): not run again."""
        from lowbit.model.artifact import save_artifact

        self._tmp = tempfile.TemporaryDirectory(prefix="lowbit-rss-")
        self.procs = {}
        self.known = dict(known or {})
        try:
            for side, ld in (("baseline", baseline), ("candidate", candidate)):
                if side in self.known:
                    continue
                if not ld.meta and ld.plan is not None and ld.recipe is not None and ld.tokenizer is not None:
                    path, recipe = str(save_artifact(ld, Path(self._tmp.name) / side)), None
                else:
                    path, recipe = rss_target(ld)
                # at a lower priority: the caller's evaluation keeps the cores, the child takes what is idle
                self.procs[side] = (path, *_rss_proc(path, config, text, recipe, nice=10))
        except BaseException:
            self.close()
            raise

    def result(self) -> dict:
        try:
            return {**self.known, **{side: _rss_result(*p) for side, p in self.procs.items()}}
        finally:
            self.close()

    def close(self) -> None:
        for _, proc, err in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
        self._tmp.cleanup()


def held_memory_pair(baseline: Model, candidate: Model, text: str, config: BenchConfig) -> dict:
    """HeldMemory(...).result(): both models' process memory, measured side by side."""
    return HeldMemory(baseline, candidate, text, config).result()


def _rss_child() -> None:
    """Entry point of the subprocess started by peak_rss_subprocess (reads its job as JSON on stdin)."""
    job = json.load(sys.stdin)
    if job.get("nice"):  # beside other work (HeldMemory): it yields the cores; what it holds does not change
        os.nice(job["nice"])
    torch.set_num_threads(job["threads"])
    from lowbit.model.load import load_model
    import importlib

    importlib.import_module("transformers.models.auto.modeling_auto")  # the floor includes what loading imports

    if job["path"] is not None:
        config = BenchConfig(**job["config"])
        loaded = load_model(job["path"])
        if job["recipe"] is not None:
            from lowbit.model.quantize import quantize_model
            from lowbit.recipe import Recipe

            quantize_model(loaded.module, Recipe.from_dict(job["recipe"]))
        prompt = text_tokens(loaded.tokenizer, job["text"] or FILLER, config.max_prompt_tokens)
        timed_request(loaded.module, [prompt] * config.batch_size, config.output_tokens, pad_id(loaded.tokenizer),
                      config.engine, config.kv_cache)
    import gc

    gc.collect()
    print(json.dumps({"peak_rss_bytes": max_rss_bytes(), "rss_bytes": rss_now_bytes()}))
