"""lowbit.benchmark.latency on the tiny model: structure, counts and consistency (no timing thresholds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit.benchmark import latency
from lowbit.benchmark.latency import BenchConfig, bench_pair, peak_rss_subprocess
from lowbit.errors import LowbitError
from lowbit.model.handle import weight_bytes
from lowbit.model.load import load_model

TEXT = ("Anarchism is a political philosophy and movement that is sceptical of all justifications for authority "
        "and seeks to abolish the institutions it claims maintain unnecessary coercion and hierarchy. ") * 8
SMALL = dict(prompt_tokens=12, output_tokens=4, requests=3, warmup=1)
STAT_KEYS = {"weight_bytes", "peak_rss_bytes", "rss_floor_bytes", "prefill_tok_s", "decode_tok_s", "throughput_tok_s",
             "ttft_ms", "latency_ms", "latencies_ms", "tokens_generated"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The machine's cores are shared; intra-op threads fighting over them make tiny runs slow.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair(tiny_dir):
    baseline, candidate = load_model(tiny_dir), load_model(tiny_dir)
    lowbit.quantize(candidate, "int8")
    return baseline, candidate


@pytest.fixture(scope="module")
def result(pair):
    return bench_pair(*pair, TEXT, BenchConfig(**SMALL), measure_rss=False)


def check_stats(s: dict, cfg: BenchConfig) -> None:
    assert set(s) == STAT_KEYS
    assert s["tokens_generated"] == cfg.requests * cfg.batch_size * cfg.output_tokens
    assert len(s["latencies_ms"]) == cfg.requests and all(x > 0 for x in s["latencies_ms"])
    for key in ("ttft_ms", "latency_ms"):
        assert s[key]["p50"] <= s[key]["p95"] <= s[key]["p99"]
        assert s[key]["p50"] > 0
    # Each request's first token comes before its end, so every ttft percentile is at most the latency's.
    assert all(s["ttft_ms"][p] <= s["latency_ms"][p] for p in ("p50", "p95", "p99"))
    assert min(s["latencies_ms"]) <= s["latency_ms"]["mean"] <= max(s["latencies_ms"])
    assert s["prefill_tok_s"] > 0 and s["decode_tok_s"] > 0 and s["throughput_tok_s"] > 0
    assert s["weight_bytes"] > 0


def test_structure_and_counts(result):
    assert set(result) == {"config", "baseline", "candidate", "ratios"}
    cfg = BenchConfig(**SMALL)
    assert result["config"] == {**result["config"], **SMALL, "batch_size": 1, "concurrency": 1}
    for side in ("baseline", "candidate"):
        check_stats(result[side], cfg)
        assert result[side]["peak_rss_bytes"] is None and result[side]["rss_floor_bytes"] is None


def test_ratios_follow_from_stats(result):
    b, c, r = result["baseline"], result["candidate"], result["ratios"]
    assert set(r) == {"decode_tok_s", "prefill_tok_s", "p95_latency", "weight_bytes", "peak_rss",
                      "p95_improvement_pct", "memory_reduction_pct"}
    assert r["decode_tok_s"] == pytest.approx(c["decode_tok_s"] / b["decode_tok_s"])
    assert r["prefill_tok_s"] == pytest.approx(c["prefill_tok_s"] / b["prefill_tok_s"])
    assert r["p95_latency"] == pytest.approx(c["latency_ms"]["p95"] / b["latency_ms"]["p95"])
    assert r["weight_bytes"] == pytest.approx(c["weight_bytes"] / b["weight_bytes"])
    assert r["p95_improvement_pct"] == pytest.approx(100 * (1 - r["p95_latency"]))
    assert r["memory_reduction_pct"] == pytest.approx(100 * (1 - r["weight_bytes"]))
    assert r["peak_rss"] is None  # not measured
    assert r["weight_bytes"] < 1  # int8 weights are smaller than float32 ones


def test_percentiles_follow_stored_latencies(result):
    lat = result["baseline"]["latencies_ms"]
    for q in (50, 95, 99):
        assert result["baseline"]["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(lat, q))


@pytest.mark.parametrize("extra", [dict(batch_size=2), dict(concurrency=2), dict(batch_size=2, concurrency=2)])
def test_batch_and_concurrency(pair, extra):
    cfg = BenchConfig(**{**SMALL, **extra})
    res = bench_pair(*pair, TEXT, cfg, measure_rss=False)
    assert res["config"]["batch_size"] == cfg.batch_size and res["config"]["concurrency"] == cfg.concurrency
    for side in ("baseline", "candidate"):
        check_stats(res[side], cfg)


def test_alternating_order_same_prompts_and_warmup_excluded(pair, monkeypatch):
    calls = []
    real = latency.timed_request

    def spy(model, prompts, new_tokens, pad, engine, kv_cache):
        calls.append((model, prompts))
        return real(model, prompts, new_tokens, pad, engine, kv_cache)

    monkeypatch.setattr(latency, "timed_request", spy)
    progress = []
    res = bench_pair(*pair, TEXT, BenchConfig(**{**SMALL, "requests": 4}), progress=lambda *a: progress.append(a),
                     measure_rss=False)
    base, cand = pair[0].module, pair[1].module
    assert len(calls) == 2 * (1 + 4)  # warm-up runs happen, for both models
    assert len(res["baseline"]["latencies_ms"]) == 4  # ... but are not recorded
    firsts = [calls[i][0] for i in range(0, len(calls), 2)]
    assert firsts == [base, cand, base, cand, base]  # the order flips every request
    for i in range(0, len(calls), 2):
        assert calls[i][1] == calls[i + 1][1] and {calls[i][0], calls[i + 1][0]} == {base, cand}
    assert progress[-1][1:] == (5, 5)


def test_measure_rss_wiring(pair, monkeypatch):
    seen = []

    def fake(path, config, text="", recipe=None):
        seen.append((path, recipe))
        return 1000 if path is None else (4000 if recipe is None else 3000)

    monkeypatch.setattr(latency, "peak_rss_subprocess", fake)
    res = bench_pair(*pair, TEXT, BenchConfig(**SMALL))
    baseline, candidate = pair
    assert seen[0] == (None, None)  # the floor
    assert seen[1] == (baseline.source["path"], None)
    assert seen[2][0] == candidate.source["path"] and seen[2][1]["name"] == "int8"  # rebuilt by quantizing
    assert (res["baseline"]["peak_rss_bytes"], res["candidate"]["peak_rss_bytes"]) == (4000, 3000)
    assert res["baseline"]["rss_floor_bytes"] == res["candidate"]["rss_floor_bytes"] == 1000
    assert res["ratios"]["peak_rss"] == pytest.approx(3000 / 4000)


def test_measure_rss_false_skips_the_subprocess(pair, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("peak_rss_subprocess must not run")

    monkeypatch.setattr(latency, "peak_rss_subprocess", boom)
    bench_pair(*pair, TEXT, BenchConfig(**{**SMALL, "requests": 1, "warmup": 0}), measure_rss=False)


def test_rss_target_of_an_artifact_is_its_folder(pair, tmp_path):
    art = lowbit.save(pair[1], tmp_path / "art")
    assert latency.rss_target(load_model(art)) == (str(art), None)


def test_prompts_are_deterministic_real_text_and_spread(pair):
    tok = pair[0].tokenizer
    cfg = BenchConfig(prompt_tokens=20, batch_size=2, seed=3)
    reqs = latency.make_requests(tok, TEXT, cfg, 5)
    assert reqs == latency.make_requests(tok, TEXT, cfg, 5)
    assert len(reqs) == 5 and all(len(r) == 2 for r in reqs)
    lengths = [len(p) for r in reqs for p in r]
    assert all(10 <= n <= 30 for n in lengths) and len(set(lengths)) > 1
    assert tok.decode(reqs[0][0]) in TEXT
    assert len({tuple(p) for r in reqs for p in r}) == 10  # consecutive slices: all prompts differ
    assert latency.make_requests(tok, "short text. ", BenchConfig(prompt_tokens=40), 2)  # repeated when short
    with pytest.raises(LowbitError, match="empty"):
        latency.make_requests(tok, "  ", cfg, 1)


def test_left_pad():
    ids, mask = latency.left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_first_token_clock_and_exact_token_count(pair):
    baseline = pair[0]
    out = latency.timed_request(baseline.module, [list(range(60, 70))], 5, latency.pad_id(baseline.tokenizer))
    assert out["new_tokens"] == 5 and out["sequences"] == 1 and out["prompt_tokens"] == 10
    assert 0 < out["ttft_s"] <= out["total_s"]


def test_weight_bytes_counts_tied_weights_once(pair):
    model = pair[0].module
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = (sum(p.numel() * 4 for p in model.parameters())
                + sum(b.numel() * b.element_size() for b in model.buffers()))
    assert weight_bytes(model) == expected


def test_config_checks(pair):
    with pytest.raises(LowbitError, match="requests"):
        BenchConfig(requests=0)
    with pytest.raises(LowbitError, match="prompt_spread"):
        BenchConfig(prompt_spread=1.0)
    assert BenchConfig.quick().requests == 4 and BenchConfig().requests == 12
    with pytest.raises(LowbitError, match="context"):  # the tiny model holds 256 positions
        bench_pair(*pair, TEXT, BenchConfig(prompt_tokens=200, output_tokens=4), measure_rss=False)


@pytest.mark.slow  # two fresh Python processes importing torch + transformers: ~10-40 s on a busy machine
def test_peak_rss_subprocess_exceeds_floor(tiny_dir):
    cfg = BenchConfig(prompt_tokens=12, output_tokens=4)
    # A parent much larger than the child: the child must report its own peak, not inherit the
    # parent's (Linux ru_maxrss survives vfork + exec).
    ballast = torch.ones(64 * 2**20)  # 256 MiB
    parent = latency.max_rss_bytes()
    floor = peak_rss_subprocess(None, cfg)
    del ballast
    peak = peak_rss_subprocess(str(tiny_dir), cfg, text=TEXT)
    assert 50 * 2**20 < floor < peak  # torch alone is tens of MB
    assert floor < parent - 128 * 2**20


@pytest.mark.slow  # two fresh Python processes, run side by side
def test_held_memory_pair_measures_each_model_in_its_own_process(tmp_path):
    import warnings

    import lowbit

    from tests.conftest import make_tiny_llama, save_hf

    # 126 MB of float weights against about 18 MB at 4 bits: a difference well above the noise (+-10 MB)
    big = make_tiny_llama(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4)
    save_hf(big, tmp_path / "fp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(lowbit.quantize(lowbit.load(str(tmp_path / "fp")), "w4-g32"), tmp_path / "w4")
    fp, w4 = lowbit.load(str(tmp_path / "fp")), lowbit.load(str(tmp_path / "w4"))
    cfg = BenchConfig(prompt_tokens=12, output_tokens=4)
    got = latency.held_memory_pair(fp, w4, TEXT, cfg)
    for side in ("baseline", "candidate"):
        assert 50 * 2**20 < got[side]["rss_bytes"] <= got[side]["peak_rss_bytes"]
    # The float weights are 108 MB more, but the candidate's process also keeps a varying amount of what
    # its load freed (allocator retention): differences down to 48 MB were seen on this test's machine.
    assert got["candidate"]["rss_bytes"] < got["baseline"]["rss_bytes"] - 25 * 2**20, got
    # quantized in memory: measured from a saved artifact, as deployed (not rebuilt from the float weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_mem = lowbit.quantize(lowbit.load(str(tmp_path / "fp")), "w4-g32")
    again = latency.held_memory_pair(fp, in_mem, TEXT, cfg)
    assert again["candidate"]["rss_bytes"] < again["baseline"]["rss_bytes"] - 25 * 2**20, again
    # the same artifact in two fresh processes: allocator retention alone moved it by 36 MB once (Intel Xeon)
    assert abs(again["candidate"]["rss_bytes"] - got["candidate"]["rss_bytes"]) < 50 * 2**20


@pytest.mark.slow  # a fresh Python process
def test_held_memory_children_work_before_the_result_is_asked_for(tiny_dir):
    """The job reaches the child when it starts (stdin written and closed), so the measurement runs beside
    the caller's work: the child finishes on its own while nobody waits on it, and result() then only
    reads what it printed. A child that fails reports its stderr, kept in a file (never a full pipe)."""
    import time

    import lowbit

    cfg = BenchConfig(prompt_tokens=12, output_tokens=4)
    model = lowbit.load(str(tiny_dir))
    held = latency.HeldMemory(model, model, TEXT, cfg, known={"baseline": {"rss_bytes": 1, "peak_rss_bytes": 1}})
    (_, proc, _), = held.procs.values()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.returncode == 0  # done without result() having been called
    got = held.result()
    assert got["baseline"]["rss_bytes"] == 1 and got["candidate"]["rss_bytes"] > 50 * 2**20
    with pytest.raises(LowbitError, match="measuring subprocess failed"):
        latency.process_memory(str(tiny_dir / "no-such-model"), cfg)
