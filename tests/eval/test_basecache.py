"""The baseline's side cached between runs: only for float baselines, keyed by what decides it,
damaged entries recomputed; an artifact baseline never reuses its float source's entries."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.eval import basecache


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_NO_BASELINE_CACHE", raising=False)
    return tmp_path / "cache" / "baseline-logits"


def test_only_a_float_model_is_cached_and_a_second_run_reads_the_entry(tiny_dir, cache, tmp_path, monkeypatch):
    import lowbit

    fp = lowbit.load(str(tiny_dir))
    assert basecache.baseline_key(fp) is not None and "torch.float32" in basecache.baseline_key(fp)
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3), "texts": ["a", "b"], "ok": True}

    first = basecache.cached("t", fp, {"n": 1}, compute)
    again = basecache.cached("t", fp, {"n": 1}, compute)
    assert len(calls) == 1 and torch.equal(first["x"], again["x"]) and again["texts"] == ["a", "b"]
    basecache.cached("t", fp, {"n": 2}, compute)  # other parameters: another entry
    assert len(calls) == 2
    # a damaged entry is recomputed, never trusted
    for f in cache.glob("t-*.pt"):
        f.write_bytes(b"not a torch file")
    basecache.cached("t", fp, {"n": 1}, compute)
    assert len(calls) == 3
    monkeypatch.setenv("LOWBIT_NO_BASELINE_CACHE", "1")
    basecache.cached("t", fp, {"n": 1}, compute)
    assert len(calls) == 4
    # quantized (in memory or as an artifact): its source's sha256 names the float model, so no key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = lowbit.quantize(lowbit.load(str(tiny_dir)), "int8")
        lowbit.save(q, tmp_path / "art")
    assert basecache.baseline_key(q) is None
    assert basecache.baseline_key(lowbit.load(str(tmp_path / "art"))) is None


def test_an_artifact_baseline_does_not_reuse_its_float_sources_cached_logits(tiny_dir, cache, tmp_path):
    import lowbit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(lowbit.quantize(lowbit.load(str(tiny_dir)), "w4-g32"), tmp_path / "w4")
    fp, w4 = lowbit.load(str(tiny_dir)), lowbit.load(str(tmp_path / "w4"))
    cfg = lowbit.EvalConfig(suites=("general", "jargon", "long_context", "json_tasks"), quick=True)
    r1 = lowbit.evaluate(fp, w4, config=cfg)  # caches the float model's side
    assert r1["divergence"]["mean_kld"] > 0.001 and any(cache.iterdir())
    # the artifact against itself: every divergence is exactly zero (the float model's entries, which
    # carry the same source sha256, would give r1's numbers back)
    r2 = lowbit.evaluate(w4, w4, config=cfg)
    assert r2["divergence"]["mean_kld"] == pytest.approx(0, abs=1e-6)
    s = {x["name"]: x for x in r2["suites"]}
    assert s["jargon"]["metrics"]["jargon_kld"]["candidate"] == pytest.approx(0, abs=1e-6)
    lc = s["long_context"]["metrics"]["ppl_all"]
    assert lc["candidate"] == pytest.approx(lc["baseline"], rel=1e-6)
    # and a cached float baseline gives the same numbers as a fresh one
    r3 = lowbit.evaluate(fp, w4, config=cfg)
    assert r3["divergence"]["mean_kld"] == pytest.approx(r1["divergence"]["mean_kld"], rel=1e-5)
    s1, s3 = ({x["name"]: x for x in r["suites"]} for r in (r1, r3))
    for name in ("jargon", "long_context", "json_tasks"):
        for key, v in s1[name]["metrics"].items():
            assert s3[name]["metrics"][key] == pytest.approx(v, rel=1e-4), (name, key)
