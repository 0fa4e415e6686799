import pytest
import yaml

from lowbit.errors import LowbitError
from lowbit.eval.gate import DEFAULT_SPEC, evaluate, load_spec, parse_spec


def make_run(ppl_c=10.1, kld=0.01, p99=0.1, worst=0.02, top1=0.95, json_c=80.0, wb=100, wc=40):
    return {
        "baseline": {"weight_bytes": wb}, "candidate": {"weight_bytes": wc},
        "divergence": {"ppl_baseline": 10.0, "ppl_candidate": ppl_c, "mean_kld": kld, "p99_kld": p99,
                       "max_sample_kld": worst, "top1": top1},
        "suites": [{"name": "tool_calling", "metric": "json_valid_pct", "baseline": 85.0, "candidate": json_c,
                    "metrics": {"json_valid_pct": {"baseline": 85.0, "candidate": json_c}}}],
    }


def test_default_spec_parses():
    spec = load_spec("default")
    assert spec.section("quality")["max_mean_kld"] == 0.02
    assert yaml.safe_load(DEFAULT_SPEC)["memory"]["reduction_pct"] == 50


def test_all_pass_and_each_failure_is_reported():
    spec = parse_spec({"quality": {"max_ppl_increase_pct": 1.5, "max_mean_kld": 0.02, "max_p99_kld": 0.3,
                                   "max_sample_kld": 0.05, "min_top1_agreement": 0.9,
                                   "suites": {"json": {"max_valid_drop": 10}}},
                       "memory": {"reduction_pct": 50}}, "t")
    ok = evaluate(spec, make_run())
    assert ok["passed"] and len(ok["criteria"]) == 7
    bad = evaluate(spec, make_run(ppl_c=10.5, worst=0.2, json_c=60.0, wc=60))
    failed = {r["name"] for r in bad["criteria"] if not r["passed"]}
    assert not bad["passed"]
    assert failed == {"general ppl increase %", "worst sample mean KLD", "json: valid JSON drop (points)",
                      "weight memory reduction %"}
    row = next(r for r in bad["criteria"] if r["name"] == "general ppl increase %")
    assert row["value"] == pytest.approx(5.0)


def test_unmeasured_criterion_fails():
    spec = parse_spec({"latency": {"p95_improvement_pct": 20}}, "t")
    res = evaluate(spec, make_run())
    assert not res["passed"] and res["criteria"][0]["detail"] == "not measured"


def test_latency_and_process_memory_rows_carry_their_evidence_or_the_reason_they_failed():
    spec = parse_spec({"latency": {"p95_improvement_pct": 0, "min_decode_speedup": 1.0},
                       "memory": {"rss_reduction_pct": 30}}, "t")
    run = make_run()
    run["bench_error"] = "LowbitError: prompts up to 4096 tokens exceed the model's context (256)"
    run["process_memory_error"] = "LowbitError: the measuring subprocess failed (exit 1)"
    res = evaluate(spec, run)
    assert not res["passed"] and all(r["passed"] is False for r in res["criteria"])
    assert all("could not run" in r["detail"] for r in res["criteria"])
    assert "exceed the model's context" in res["criteria"][0]["detail"]
    run = make_run()
    run["bench"] = {"baseline": {"latency_ms": {"p95": 200.0}, "decode_tok_s": 50.0},
                    "candidate": {"latency_ms": {"p95": 150.0}, "decode_tok_s": 40.0},
                    "ratios": {"p95_improvement_pct": 25.0, "decode_tok_s": 0.8}}
    run["process_memory"] = {"baseline": {"rss_bytes": 1000e6}, "candidate": {"rss_bytes": 600e6}}
    rows = {r["name"]: r for r in evaluate(spec, run)["criteria"]}
    assert rows["p95 latency improvement %"]["passed"] and rows["p95 latency improvement %"]["detail"] == "p95 200 ms -> 150 ms"
    assert rows["decode tokens/s speedup"]["passed"] is False and "50.0 -> 40.0" in rows["decode tokens/s speedup"]["detail"]
    assert rows["process memory reduction %"]["value"] == pytest.approx(40) and rows["process memory reduction %"]["passed"]
    assert "1000 MB -> 600 MB" in rows["process memory reduction %"]["detail"]


def test_a_latency_criterion_where_the_bench_cannot_run_fails_with_the_reason(tiny_dir):
    import lowbit

    fp = lowbit.load(str(tiny_dir))
    spec = parse_spec({"quality": {"max_mean_kld": 1.0}, "latency": {"min_decode_speedup": 0.5},
                       "bench": {"prompt_tokens": 4000}}, "t")  # the tiny model's context is 256 tokens
    run = lowbit.gate(spec, fp, fp, quick=True)
    row = next(r for r in run["gate"]["criteria"] if r["name"] == "decode tokens/s speedup")
    assert row["passed"] is False and "could not run" in row["detail"] and "context" in row["detail"]
    assert not run["gate"]["passed"]


@pytest.mark.parametrize("data, word", [
    ({"quality": {"max_kld": 1}}, "quality.max_kld"),
    ({"qualty": {}}, "unknown section 'qualty'"),
    ({"quality": {"max_mean_kld": "low"}}, "must be a number"),
    ({"quality": {"suites": {"math": {}}}}, "quality.suites.math"),
    ({"quality": {"suites": {"user": {"min_pass_pct": 90}}}}, "needs a 'file'"),
    ([1, 2], "mapping"),
])
def test_malformed_specs(data, word):
    with pytest.raises(LowbitError, match=word):
        parse_spec(data, "t")


def test_spec_file_errors(tmp_path):
    with pytest.raises(LowbitError, match="cannot be read"):
        load_spec(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("quality: {max_mean_kld: [\n")
    with pytest.raises(LowbitError, match="not valid YAML"):
        load_spec(str(bad))


def test_scientific_notation_that_yaml_reads_as_text_gets_a_hint(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("quality: {max_mean_kld: 1e-3}\n")  # YAML 1.1 needs a decimal point to read a float
    with pytest.raises(LowbitError, match=r"write it with a decimal point, e.g. 1.0e-03"):
        load_spec(str(spec))
    spec.write_text("quality: {max_mean_kld: 1.0e-3}\n")
    assert load_spec(str(spec)).section("quality")["max_mean_kld"] == 0.001
