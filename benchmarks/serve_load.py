"""lowbit serve under load, on loopback: latency percentiles and throughput, the shadow's cost, and a
fault injected part-way.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 200] [--max-tokens 8]
    .venv/bin/python benchmarks/serve_load.py --tiny --requests 5      # tiny random models, seconds

The server runs in this process (uvicorn in a thread, bound to 127.0.0.1 on a free port); `--clients`
concurrent httpx clients each send `--requests` chat requests, one after another. The candidate is
the bundled SmolLM2-135M quantized to W4 g128 (round to nearest), the fallback the FP32 model. Every phase but `nobatch` decodes the requests waiting in a model's queue together (--max-batch,
default 8, the lean loop's batch). Phases:

  alone    canary 100%, no shadow
  shadow   canary 100%, shadow on: every answer replayed to the fallback and scored off the client's path
  fault    canary 50%, shadow on, canary analysis (window 20) with a lenient spec (its quality limits pass
           this candidate, so only the fault can fail a window): the candidate raises for the middle third
           of the requests; every request must still be answered (by the fallback), and the analysis
           must roll the canary back
  stall    as fault, but the candidate stalls past its timeout (--stall-timeout, 2 s) instead of raising
  nobatch  as alone, one request at a time (--max-batch 1): what batching buys

`--short-requests N` gives the stall and nobatch phases N requests per client (default: --requests).

Reported per phase: requests, failed, p50/p95/p99 latency (ms), requests/s, answers by model and
reason, shadow pairs scored/dropped, canary decisions. A 429 is retried after its Retry-After (and
counted); any other non-200 is a failure. Load is bounded: clients x requests requests, a per-request
client timeout, and loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.presets import write_section  # noqa: E402
from lowbit.serve import ServeConfig, create_app  # noqa: E402
from lowbit.serve.engine import Backend  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "Write one sentence about the sea.",
           "What is 12 times 12?", "Give a synonym for happy.", "Why is the sky blue?"]


class Faulty(Backend):
    """The candidate, made to raise (mode "raise") or to stall until cancelled ("stall") while `fault` is set."""

    def __init__(self, model, name: str, mode: str = "raise") -> None:
        super().__init__(model, name)
        self.fault = threading.Event()
        self.mode = mode

    def generate_batch(self, items):
        if self.fault.is_set():
            if self.mode == "raise":
                return [RuntimeError("injected fault") for _ in items]
            from lowbit.serve.engine import Cancelled

            while not all(item[3]() for item in items):  # each row's should_stop: its request gave up on it
                time.sleep(0.01)
            return [Cancelled() for _ in items]
        return super().generate_batch(items)


# the fault phases' spec: quality limits this candidate meets (on-grid W4 RTN, live KLD about 0.4), so a
# window fails only on the analysis' own error criterion (candidate errors + timeouts above 5%)
LENIENT_SPEC = """\
quality:
  max_mean_kld: 1.5
  max_p99_kld: 20.0
  min_top1_agreement: 0.4
"""


def models(tiny: bool):
    if tiny:
        from tests.serve.conftest import tiny_model

        return tiny_model(1), tiny_model(0), "tiny-w", "tiny-fp32"
    import lowbit

    fp32 = lowbit.load("smollm2-135m")
    cand = lowbit.quantize(lowbit.load("smollm2-135m"), "w4-g128")
    return cand, fp32, "smollm2-w4-g128", "smollm2-135m"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))] * 1000 if s else float("nan")


def serve_in_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=30))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    return server, th, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def load(base: str, clients: int, requests: int, max_tokens: int, on_progress=None) -> dict:
    import httpx

    lat: list[float] = []
    by: Counter = Counter()
    failed, retried = [], 0
    done = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        async def one_client(i: int):
            nonlocal retried, done
            for j in range(requests):
                body = {"model": "lowbit", "messages": [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                        "max_tokens": max_tokens, "user": f"client-{i}"}
                t0 = time.perf_counter()
                for _attempt in range(20):
                    try:
                        r = await http.post("/v1/chat/completions", json=body)
                    except httpx.HTTPError as e:
                        failed.append(f"{type(e).__name__}: {e}")
                        r = None
                        break
                    if r.status_code != 429:
                        break
                    retried += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                if r is not None and r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                    by[(r.headers["x-lowbit-model"], r.headers["x-lowbit-reason"])] += 1
                elif r is not None:
                    failed.append(f"{r.status_code}: {r.text[:200]}")
                done += 1
                if on_progress:
                    on_progress(done)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"requests": clients * requests, "ok": len(lat), "failed": len(failed), "failures": failed[:5],
            "retried_429": retried, "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95), "p99_ms": pct(lat, 0.99),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"), "req_per_s": len(lat) / wall,
            "wall_s": wall, "answered_by": {f"{m} ({why})": n for (m, why), n in by.most_common()}}


def phase(name: str, cand, fb, cand_name, fb_name, args, shadow: bool, spec: str | None, fault: str | None, db: Path,
          max_batch: int, requests: int) -> dict:
    backend = Faulty(cand, cand_name, fault or "raise")
    cfg = ServeConfig(candidate=backend, fallback=fb, fallback_name=fb_name, canary=50 if spec else 100, shadow=shadow,
                      spec=spec, step_pct=10, max_batch=max_batch,
                      queue_size=max(64, 2 * args.clients), window=20, max_failures=2, registry_db=db,
                      timeout_s=300, candidate_timeout_s=args.stall_timeout if fault == "stall" else 120)
    app = create_app(cfg)
    server, th, base = serve_in_thread(app)
    total = args.clients * requests

    def progress(done: int):  # the fault covers the middle third of the requests
        if fault:
            if total // 3 <= done < 2 * total // 3:
                backend.fault.set()
            else:
                backend.fault.clear()

    try:
        # warm-up, not measured: first-call costs (kernel planning, allocator, thread pools)
        asyncio.run(load(base, min(args.clients, 4), 1, args.max_tokens))
        if srv_reset := app.state.server.scorer:
            from lowbit.serve.shadow import wait_idle

            wait_idle(srv_reset, 60)
        t_cpu = time.process_time()
        res = asyncio.run(load(base, args.clients, requests, args.max_tokens, progress))
        res["cpu_util"] = (time.process_time() - t_cpu) / res["wall_s"] / (os.cpu_count() or 1)
        srv = app.state.server
        if srv.scorer:
            from lowbit.serve.shadow import wait_idle

            wait_idle(srv.scorer, 60)
            s = srv.scorer.summary()
            res["shadow"] = {k: s[k] for k in ("pairs", "mean_kld", "top1", "token_agreement")} | {"counts": s["counts"]}
        if srv.analysis:
            res["decisions"] = [f"{d['action']} {d['share_before']:g}->{d['share_after']:g}" for d in srv.analysis.decisions]
        res["final_share"] = srv.router.share
    finally:
        server.should_exit = True
        th.join(timeout=30)
    res["phase"] = name
    res["max_batch"] = max_batch
    res["load_avg"] = os.getloadavg()[1]
    return res


def decisions_text(decisions: list[str]) -> str:
    """Canary decisions ("action before->after"), runs of the same unchanged share folded into one."""
    out, run = [], None
    for d in decisions:
        action, shares = d.split(" ", 1)
        before, after = shares.split("->")
        if before == after:  # the share did not move: held (older runs logged these at the maximum as step_up)
            if run and run[0] == before:
                run[1] += 1
                continue
            run = [before, 1]
            out.append(run)
        else:
            run = None
            out.append(f"{action} {before}->{after}")
    return ", ".join(x if isinstance(x, str) else f"held at {x[0]}% x{x[1]}" for x in out)


PHASES = {  # name: (shadow, spec, fault, batched)
    "alone": (False, None, None, True), "shadow": (True, None, None, True),
    "fault": (True, "lenient", "raise", True), "stall": (True, "lenient", "stall", True),
    "nobatch": (False, None, None, False)}


def table(results: list[dict], args, cand_name: str, fb_name: str) -> str:
    from lowbit import native
    from lowbit.native import cpu_name

    lines = [f"`benchmarks/serve_load.py --clients {args.clients} --requests {args.requests} --short-requests "
             f"{args.short_requests} --max-tokens {args.max_tokens}` on {cpu_name()} ({os.cpu_count()} cores, "
             f"{native.describe()}), in one process: uvicorn on 127.0.0.1, {args.clients} concurrent httpx clients, "
             f"each sending its requests one after another (short chat prompts, greedy, max_tokens "
             f"{args.max_tokens}). Candidate {cand_name} (round to nearest), fallback {fb_name} (FP32); one worker "
             f"thread per model. A 429 is retried after its Retry-After; any other non-200 counts as failed.", "",
             "| phase | max batch | requests | failed | 429 retried | p50 ms | p95 ms | p99 ms | req/s | answered by "
             "| shadow pairs scored / dropped | canary decisions | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sh = r.get("shadow")
        shadow = "-" if not sh else (f"{sh['counts']['scored']} / {sh['counts']['dropped_full'] + sh['counts']['dropped_preempted']}"
                                     + (f" (KLD {sh['mean_kld']:.3f})" if sh["mean_kld"] is not None else ""))
        canary = decisions_text(r.get("decisions") or []) or f"{r['final_share']:g}% throughout"
        by = "; ".join(f"{k}: {v}" for k, v in r["answered_by"].items())
        lines.append(f"| {r['phase']} | {r['max_batch']} | {r['requests']} | {r['failed']} | {r['retried_429']} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['req_per_s']:.2f} | {by} | "
                     f"{shadow} | {canary} | {r['load_avg']:.1f} |")
    get = {r["phase"]: r for r in results}
    notes = []
    if "alone" in get and "shadow" in get:
        a, s = get["alone"], get["shadow"]
        notes.append(f"Shadowing's cost on client p95: {s['p95_ms'] / a['p95_ms']:.2f}x the candidate alone "
                     f"({s['p95_ms'] - a['p95_ms']:+.0f} ms); throughput {s['req_per_s'] / a['req_per_s']:.2f}x.")
    if "alone" in get and "nobatch" in get:
        a, n = get["alone"], get["nobatch"]
        notes.append(f"Batching (max {a['max_batch']}) against one request at a time: throughput "
                     f"{a['req_per_s'] / n['req_per_s']:.2f}x, p95 {a['p95_ms'] / n['p95_ms']:.2f}x.")
    for f in ("fault", "stall"):
        if f in get:
            r = get[f]
            rolled = any(d.startswith("rollback") for d in r.get("decisions") or [])
            notes.append(f"{f}: {r['ok']} of {r['requests']} requests answered, {r['failed']} failed; canary "
                         f"{'rolled back' if rolled else 'NOT rolled back'} (final share {r['final_share']:g}%).")
    lines += [""] + [f"- {n}" for n in notes]
    lines += ["", "Shadow work runs only while no client waits and gives way when one arrives, so under this "
              "saturating load most pairs are dropped rather than delaying clients; the fault phases' spec is "
              "benchmarks/serve_load.py's LENIENT_SPEC (quality limits this candidate meets), so only the injected "
              "fault can fail a window."]
    return "\n".join(lines)


def main() -> None:
    import logging

    logging.getLogger("lowbit.serve").setLevel(logging.ERROR)  # one warning per injected fault is noise here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200, help="requests per client")
    ap.add_argument("--short-requests", type=int, help="requests per client in the stall and nobatch phases")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a smoke run; writes no section)")
    ap.add_argument("--phases", default="alone,shadow,fault,stall,nobatch")
    ap.add_argument("--max-batch", type=int, default=8, help="requests a model decodes together (all phases but nobatch)")
    ap.add_argument("--stall-timeout", type=float, default=2.0, help="the stall phase's --candidate-timeout")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--from-json", type=Path, help="render the results a run stored with --json (give that run's "
                                                   "--clients/--requests/--short-requests/--max-tokens); measure nothing")
    args = ap.parse_args()
    args.short_requests = args.short_requests or args.requests
    if args.from_json:
        body = table(json.loads(args.from_json.read_text()), args, "smollm2-w4-g128", "smollm2-135m")
        print(body)
        write_section(args.out, "serve-load", "## lowbit serve under load (loopback)\n\n" + body)
        return
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 10_000 and 1 <= args.max_tokens <= 256
            and 1 <= args.short_requests <= 10_000):
        ap.error("keep the load bounded: --clients 1..256, --requests 1..10000, --max-tokens 1..256")
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    cand, fb, cand_name, fb_name = models(args.tiny)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "runs.sqlite"
        lenient = Path(tmp) / "lenient.yaml"
        lenient.write_text(LENIENT_SPEC)
        for name in args.phases.split(","):
            shadow, spec, fault, batched = PHASES[name]
            n = args.short_requests if name in ("stall", "nobatch") else args.requests
            print(f"phase {name}: {args.clients} clients x {n} requests ...", file=sys.stderr, flush=True)
            results.append(phase(name, cand, fb, cand_name, fb_name, args, shadow, str(lenient) if spec else None,
                                 fault, db, args.max_batch if batched else 1, n))
            print(f"  {results[-1]['ok']} ok, {results[-1]['failed']} failed, p95 {results[-1]['p95_ms']:.0f} ms, "
                  f"{results[-1]['req_per_s']:.2f} req/s", file=sys.stderr, flush=True)
    body = table(results, args, cand_name, fb_name)
    print(body)
    for r in results:
        if r["failures"]:
            print(f"{r['phase']}: first failures: {r['failures']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.tiny:
        write_section(args.out, "serve-load", "## lowbit serve under load (loopback)\n\n" + body)


if __name__ == "__main__":
    main()
