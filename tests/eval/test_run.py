"""eval / gate orchestration on the tiny model: self-comparison, damage detection, CLI exit codes."""

import json

import pytest
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.eval.run import EvalConfig, evaluate, load_pair, parse_suites
from lowbit.formats import QuantSpec
from lowbit.model.load import load_model
from lowbit.recipe import Override, Recipe
from tests.conftest import make_tiny_llama, make_tokenizer

runner = CliRunner(env={"COLUMNS": "200"})
OPTS = EvalConfig(suites=("general", "jargon", "long_context"), quick=True, samples=3, seq_len=64)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def test_model_against_itself_is_identical(tiny_dir):
    base, cand = load_pair(str(tiny_dir), str(tiny_dir), lambda s: None)
    run = evaluate(base, cand, OPTS)
    d = run["divergence"]
    assert d["mean_kld"] == pytest.approx(0, abs=1e-6) and d["max_kld"] == pytest.approx(0, abs=1e-5)
    assert d["top1"] == 1.0 and d["ppl_baseline"] == pytest.approx(d["ppl_candidate"], rel=1e-6)
    names = [s["name"] for s in run["suites"]]
    assert names == ["general", "jargon", "long_context"]
    for s in run["suites"]:
        assert s["baseline"] == pytest.approx(s["candidate"], rel=1e-6)
    json.dumps(run)  # a run is plain JSON


def test_damaged_candidate_diverges_more_than_int8(tiny_dir, tmp_path):
    base = load_model(tiny_dir)
    honest = load_model(tiny_dir)
    lowbit.quantize(honest, "int8")
    damaged = load_model(tiny_dir)
    two_bit = QuantSpec(kind="int", bits=2, granularity="channel")
    lowbit.quantize(damaged, Recipe(scheme=QuantSpec(kind="int", bits=8),
                                          overrides=(Override("model.layers.0.mlp.down_proj", two_bit),)))
    good = evaluate(base, honest, OPTS)["divergence"]
    bad = evaluate(base, damaged, OPTS)["divergence"]
    assert bad["mean_kld"] > 5 * good["mean_kld"] and bad["top1"] < good["top1"]


def test_baseline_side_is_cached(tiny_dir, tmp_path):
    from lowbit.eval import divergence

    base, cand = load_pair(str(tiny_dir), str(tiny_dir), lambda s: None)
    evaluate(base, cand, EvalConfig(suites=(), quick=True, samples=2, seq_len=32))
    files = list(divergence.cache_dir().glob("*.pt"))
    assert len(files) == 1
    calls = []
    orig = base.module.forward
    base.module.forward = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    evaluate(base, cand, EvalConfig(suites=(), quick=True, samples=2, seq_len=32))
    assert calls == []  # the baseline was not run again


def test_different_tokenizers_are_refused(tiny_dir, tmp_path):
    other = tmp_path / "other"
    make_tiny_llama(seed=1).save_pretrained(other)
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tok.save_pretrained(other)
    with pytest.raises(LowbitError, match="different tokenizers"):
        load_pair(str(tiny_dir), str(other), lambda s: None)
    r = runner.invoke(app, ["eval", str(tiny_dir), str(other), "--no-report"])
    assert r.exit_code == 2 and "different tokenizers" in " ".join(r.output.split())


def test_parse_suites():
    assert parse_suites("general,user:a.jsonl,json") == (("general", "json"), ("a.jsonl",))
    with pytest.raises(LowbitError, match="'math' is unknown"):
        parse_suites("general,math")


def test_cli_eval_and_gate_write_reports_and_exit_codes(tiny_dir, tmp_path):
    art = tmp_path / "int8"
    assert runner.invoke(app, ["quantize", "--model", str(tiny_dir), "--recipe", "int8", "--out", str(art)]).exit_code == 0
    reports = tmp_path / "reports"
    r = runner.invoke(app, ["eval", str(tiny_dir), str(art), "--quick", "--suites", "general,jargon", "--samples", "2",
                            "--seq-len", "48", "--report-dir", str(reports)])
    assert r.exit_code == 0, r.output
    assert "mean KLD" in r.output and len(list(reports.glob("eval-*/report.html"))) == 1
    spec = tmp_path / "spec.yaml"
    spec.write_text("quality: {max_mean_kld: 1.0, min_top1_agreement: 0.0}\nmemory: {reduction_pct: 50}\n"
                    "eval: {samples: 2, seq_len: 48}\n")
    r = runner.invoke(app, ["gate", str(spec), str(tiny_dir), str(art), "--quick", "--report-dir", str(reports)])
    assert r.exit_code == 0, r.output
    assert "GATE PASSED" in r.output and "weight memory reduction %" in r.output
    spec.write_text("quality: {max_mean_kld: 0.0}\neval: {samples: 2, seq_len: 48}\n")
    r = runner.invoke(app, ["gate", str(spec), str(tiny_dir), str(art), "--quick", "--no-report"])
    assert r.exit_code == 1 and "GATE FAILED" in r.output
    spec.write_text("quality: {max_kld: 0.0}\n")
    r = runner.invoke(app, ["gate", str(spec), str(tiny_dir), str(art), "--no-report"])
    assert r.exit_code == 2 and "quality.max_kld" in r.output
    r = runner.invoke(app, ["runs"])
    assert r.exit_code == 0 and "gate" in r.output and "eval" in r.output


def test_cli_bench_on_tiny(tiny_dir, tmp_path):
    art = tmp_path / "int8"
    assert runner.invoke(app, ["quantize", "--model", str(tiny_dir), "--recipe", "int8", "--out", str(art)]).exit_code == 0
    r = runner.invoke(app, ["bench", str(tiny_dir), str(art), "--requests", "2", "--output-tokens", "3",
                            "--prompt-tokens", "16", "--no-rss", "--report-dir", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "decode tok/s" in r.output and "latency p95" in r.output
    assert len(list((tmp_path / "rep").glob("bench-*/report.md"))) == 1
    r = runner.invoke(app, ["runs", "--kind", "bench"])
    assert r.exit_code == 0 and "bench" in r.output
    r = runner.invoke(app, ["runs", "--show", "999"])
    assert r.exit_code == 2 and "no run with id 999" in " ".join(r.output.split())


def test_bad_user_suite_fails_before_models_load(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    r = runner.invoke(app, ["eval", str(tmp_path / "no-model"), str(tmp_path / "no-model"),
                            "--suites", f"user:{bad}", "--no-report"])
    assert r.exit_code == 2 and "line 2" in r.output and "no such file" not in r.output
