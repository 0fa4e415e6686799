"""lowbit tune on a tiny random Llama: the sensitivity estimate, the allocator, the loop and its outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.eval.gate import parse_spec
from lowbit.formats.qtensor import qdq
from lowbit.tuner import TuneConfig, recipe_for, tune, write_outputs
from lowbit.tuning import Measurement, for_budget, for_quality, measure, parse_duration, parse_size, uniforms
from lowbit.tuning.menu import BY_KEY, MENU, parse_menu

SPEC = {"quality": {"max_mean_kld": 0.05}, "memory": {"reduction_pct": 50}, "eval": {"samples": 2, "seq_len": 32}}
FAST = dict(method="rtn", calib="wikipedia", samples=4, seq_len=32)


@pytest.fixture(scope="module")
def base(tiny_dir):
    return lowbit.load(str(tiny_dir))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def meas(base, ids):
    return measure(base, ids)


def _kld(a, b, ids) -> float:
    with torch.no_grad():
        p, q = torch.log_softmax(a(ids).logits, -1), torch.log_softmax(b(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _quantized_copy(base, meas, key: str, only: str | None = None):
    q = copy.deepcopy(base.module)
    for m in meas.modules:
        if only is None or m.name == only:
            w = q.get_submodule(m.name).weight
            with torch.no_grad():
                w.copy_(qdq(w.data, BY_KEY[key].spec))
    return q


def test_estimate_tracks_the_real_kld(base, meas, ids):
    # seen on this model: per-module estimates within 0.7-1.5x of the real KLD, and the sum over modules
    # within 10% of quantizing all of them at once; the bounds below leave room for other seeds
    for name in [m.name for m in meas.modules][:4]:
        est = next(m for m in meas.modules if m.name == name).kld["int3-g64-asym"]
        real = _kld(base.module, _quantized_copy(base, meas, "int3-g64-asym", name), ids)
        assert 0.5 * real < est < 2.0 * real, (name, est, real)
    est_all = sum(m.kld["int4-g32"] for m in meas.modules)
    real_all = _kld(base.module, _quantized_copy(base, meas, "int4-g32"), ids)
    assert 0.6 * real_all < est_all < 1.6 * real_all
    # more bits never cost more divergence, and float costs none
    for m in meas.modules:
        assert m.kld["f16"] == 0.0
        assert m.kld["int8-ch"] < m.kld["int4-g32-asym"] < m.kld["int3-g128-asym"]


def test_bytes_match_the_saved_artifact(base, meas, tmp_path):
    from lowbit.exporters.inspect import artifact_summary

    alloc = for_budget(meas, int(5.0 * meas.params / 8))
    q = lowbit.quantize(lowbit.Model(copy.deepcopy(base.module), base.tokenizer), recipe_for(alloc, meas, "rtn"))
    lowbit.save(q, tmp_path / "a")
    stored = artifact_summary(tmp_path / "a")["weight_bytes"]
    assert abs(stored - alloc.bytes) <= 0.01 * alloc.bytes, (stored, alloc.bytes)


def test_budget_allocation_fits_and_beats_uniform(meas):
    for bits in (4.4, 4.7, 5.5, 7.0):
        budget = int(bits * meas.params / 8)
        a = for_budget(meas, budget)
        assert a.bytes <= budget
        fitting = [u for u in uniforms(meas) if u.bytes <= budget]
        assert all(a.est_kld <= u.est_kld + 1e-12 for u in fitting)
    tight = for_budget(meas, int(4.7 * meas.params / 8))
    assert len(set(tight.choice.values())) > 1  # a real mix, not one format


def test_budget_below_the_smallest_format_is_refused(meas):
    with pytest.raises(LowbitError, match="below the smallest model the menu can make"):
        for_budget(meas, int(1.0 * meas.params / 8))


def test_quality_allocation_is_the_smallest_meeting_the_target(meas):
    target = sum(m.kld["int4-g32-asym"] for m in meas.modules)
    a = for_quality(meas, target)
    assert a.est_kld <= target
    meeting = [u for u in uniforms(meas) if u.est_kld <= target]
    assert all(a.bytes <= u.bytes for u in meeting)


def test_measurement_file_round_trip_and_refusals(meas, tmp_path):
    p = meas.save(tmp_path / "m.json")
    back = Measurement.load(p, meas.model["sha256"])
    assert [m.kld for m in back.modules] == [m.kld for m in meas.modules]
    with pytest.raises(LowbitError, match="made for model .* not this one"):
        Measurement.load(p, "0" * 64)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LowbitError, match="bad.json: not JSON"):
        Measurement.load(tmp_path / "bad.json")
    data = json.loads(p.read_text())
    data["modules"][0]["kld"]["int8-ch"] = -1
    (tmp_path / "neg.json").write_text(json.dumps(data))
    with pytest.raises(LowbitError, match="not finite and non-negative"):
        Measurement.load(tmp_path / "neg.json")
    del data["modules"][0]["rows"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(LowbitError, match="missing or malformed"):
        Measurement.load(tmp_path / "missing.json")


def test_parsers():
    assert parse_size("90MB") == 90_000_000 and parse_size("1.5GiB") == int(1.5 * 1024 ** 3)
    assert parse_duration("20m") == 1200 and parse_duration("90") == 90
    for bad in ("-3MB", "lots", "0"):
        with pytest.raises(LowbitError, match="--max-size"):
            parse_size(bad)
    with pytest.raises(LowbitError, match="--time-budget"):
        parse_duration("soon")
    with pytest.raises(LowbitError, match="not in the tuner's menu"):
        parse_menu("int4-g32,int9")
    assert parse_menu(None) == MENU


def test_tune_passes_saves_and_the_recipe_reproduces_it(tiny_dir, tmp_path):
    cfg = TuneConfig(spec=parse_spec(SPEC, "test spec"), max_bits=5.0, measurement=tmp_path / "m.json", **FAST)
    res = tune(str(tiny_dir), cfg, out=tmp_path / "tuned", record=False)
    assert res.passed and res.best is not None and res.out is not None
    assert res.best.alloc.bytes <= int(5.0 * res.measurement.params / 8)
    assert all(t.stored_bytes <= int(5.0 * res.measurement.params / 8) for t in res.trials)
    assert res.best in res.pareto
    # trial 2 under a budget is the best uniform scheme: the result is never worse than it, measured
    uniform = [t for t in res.trials if t.alloc.how.startswith("uniform")]
    assert uniform and all(res.best.mean_kld <= u.mean_kld for u in uniform if u.passed)
    paths = write_outputs(res, str(tiny_dir), cfg, tmp_path / "tuned-tune", tmp_path / "tuned")
    md = paths["md"].read_text()
    assert "Per module: format and why" in md and "x the median sensitivity" in md
    assert "lowbit quantize --model" in json.loads(paths["json"].read_text())["reproduce"]
    # the recipe file rebuilds the same weights with lowbit quantize (RTN: deterministic)
    again = lowbit.quantize(str(tiny_dir), str(paths["recipe"]))
    saved = lowbit.load(tmp_path / "tuned")
    for (n, a), (_, b) in zip(sorted(again.module.state_dict().items()), sorted(saved.module.state_dict().items())):
        assert torch.equal(a, b), n
    # a second budget reads the saved measurement instead of measuring again
    said = []
    tune(str(tiny_dir), TuneConfig(**{**cfg.__dict__, "max_bits": 6.0, "max_trials": 1}), record=False, say=said.append)
    assert any("read from" in s for s in said)


def test_gptq_permutations_fit_in_the_budget(tiny_dir):
    budget_bits = 5.0
    res = tune(str(tiny_dir), TuneConfig(spec=parse_spec({**SPEC, "quality": {"max_mean_kld": 1.0}}, "lenient"),
                                         max_bits=budget_bits, max_trials=1,
                                         **{**FAST, "method": "gptq"}), record=False)
    t = res.trials[0]
    assert t.stored_bytes > t.alloc.bytes  # the act-order permutations are stored too
    assert t.stored_bytes <= int(budget_bits * res.measurement.params / 8)


def test_unreachable_spec_returns_the_closest_with_failures(tiny_dir, tmp_path):
    sp = parse_spec({**SPEC, "quality": {"max_mean_kld": 1e-9}}, "strict spec")
    res = tune(str(tiny_dir), TuneConfig(spec=sp, max_bits=4.6, max_trials=3, **FAST), out=tmp_path / "never",
               record=False)
    assert not res.passed and res.best is None and res.model is None
    assert res.closest and res.closest[0].failed and res.closest[0].failed[0]["name"] == "mean KLD"
    assert not (tmp_path / "never").exists()  # a failing model is not saved
    assert any("no trial passed" in n for n in res.notes)
    # the uniform scheme, estimated worse than the mix that already failed, is not built
    assert any("was not built" in n for n in res.notes)
    assert not any(t.alloc.how.startswith("uniform") for t in res.trials)


def test_trials_are_recorded_in_the_run_registry(tiny_dir, tmp_path, monkeypatch):
    from lowbit.report.registry import get_run, list_runs

    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    res = tune(str(tiny_dir), TuneConfig(spec=parse_spec(SPEC, "s"), max_bits=5.0, max_trials=1, **FAST))
    rows = list_runs(kind="gate", db=tmp_path / "runs.sqlite")
    assert [r["id"] for r in rows] == [res.trials[0].run_id]
    run = get_run(res.trials[0].run_id, db=tmp_path / "runs.sqlite")["run"]
    assert run["tune"]["trial"] == 1 and run["candidate"]["recipe"]["overrides"]


def test_time_budget_keeps_what_it_has(tiny_dir):
    res = tune(str(tiny_dir), TuneConfig(spec=parse_spec(SPEC, "s"), max_bits=5.0, time_budget_s=1e-3, **FAST),
               record=False)
    assert not res.passed and any("time budget" in n for n in res.notes)


def test_an_existing_out_is_refused_before_any_work(tiny_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    said = []
    with pytest.raises(LowbitError, match="already exists; fix: pass --force"):
        tune(str(tiny_dir), TuneConfig(spec=parse_spec(SPEC, "s"), **FAST), out=tmp_path / "taken", say=said.append)
    assert said == []  # nothing was loaded or measured


def test_spec_without_quality_is_refused(tiny_dir):
    with pytest.raises(LowbitError, match="no quality criterion"):
        tune(str(tiny_dir), TuneConfig(spec=parse_spec({"memory": {"reduction_pct": 50}}, "mem only"), **FAST))


def test_config_checks():
    for kw, msg in [({"max_bits": 4, "max_size": 10}, "one budget"), ({"max_bits": 0.5}, "out of range"),
                    ({"method": "smoothquant"}, "not a weight-only method"), ({"min_memory_reduction": 120}, "between 0")]:
        with pytest.raises(LowbitError, match=msg):
            TuneConfig(**kw).check()


def test_cli_exit_codes(tiny_dir, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({**SPEC, "quality": {"max_mean_kld": 0.000000001}}).replace("1e-09", "1.0e-9"))
    runner = CliRunner()
    common = [str(tiny_dir), "--spec", str(spec), "--method", "rtn", "--calib", "wikipedia", "--samples", "4",
              "--seq-len", "32"]
    r = runner.invoke(app, ["tune", *common, "--out", str(tmp_path / "o"), "--max-bits", "4.6", "--max-trials", "2"])
    assert r.exit_code == 1, r.output
    assert "NO TRIAL PASSED" in r.output and (tmp_path / "o-tune" / "tune.html").is_file()
    r = runner.invoke(app, ["tune", *common, "--out", str(tmp_path / "o2"), "--max-bits", "0.5"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = runner.invoke(app, ["tune", *common, "--out", str(tmp_path / "o3"), "--max-bits", "4", "--gguf", "--menu", "int4-g32"])
    assert r.exit_code == 2 and "not both" in r.output
    (tmp_path / "other.json").write_text("[]")
    r = runner.invoke(app, ["tune", *common, "--out", str(tmp_path / "o4"), "--max-bits", "4",
                            "--measurement", str(tmp_path / "other.json")])
    assert r.exit_code == 2 and "other.json" in r.output


def test_time_budget_expiring_mid_trial_keeps_the_best_before_it(tiny_dir, monkeypatch):
    import time as real_time

    import lowbit.tuner as tuner

    late = {"now": False}

    def say(msg: str) -> None:
        if "trial 2: quantizing" in msg:
            late["now"] = True  # the clock jumps past the budget while trial 2 runs

    monkeypatch.setattr(tuner.time, "perf_counter", lambda: real_time.monotonic() + (1e6 if late["now"] else 0))
    res = tune(str(tiny_dir), TuneConfig(spec=parse_spec(SPEC, "s"), max_bits=5.0, time_budget_s=3600, **FAST),
               record=False, say=say)
    assert res.passed and res.best.index == 1
    assert res.trials[-1].index == 2 and res.trials[-1].stopped.startswith("time budget expired mid-trial")
    assert any("expired during trial 2" in n for n in res.notes)


def test_a_calibrated_method_far_above_the_estimate_falls_back_to_rtn(tmp_path):
    # weights already on the int4 g32 (Q4_1-style) grid, as the bundled SmolLM2's are: RTN keeps them
    # exactly (estimate 0), GPTQ moves them; the tuner must notice and retry with RTN
    from tests.conftest import make_tiny_llama, save_hf

    model = make_tiny_llama(seed=5)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                mod.weight.copy_(qdq(mod.weight.data, BY_KEY["int4-g32-asym"].spec))
    folder = save_hf(model, tmp_path / "on-grid")
    sp = parse_spec({**SPEC, "quality": {"max_mean_kld": 0.001}}, "s")
    res = tune(str(folder), TuneConfig(spec=sp, max_trials=3, menu=parse_menu("f16,int4-g32-asym"),
                                       **{**FAST, "method": "gptq"}), record=False)
    methods = [t.method for t in res.trials]
    assert methods[0] == "gptq" and "rtn" in methods, [t.summary() for t in res.trials]
    assert any("RTN instead of gptq" in t.why for t in res.trials)
    assert res.passed and res.best.method == "rtn"


def test_the_full_stage_reuses_the_quality_stages_divergence(tiny_dir, monkeypatch):
    """A spec with suites runs a trial in two stages (quality criteria, then the whole spec); a trial that
    passes the first is not measured twice: the second reuses its divergence, and says so."""
    from lowbit.eval import divergence

    calls = []
    real = divergence.compare

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(divergence, "compare", counting)
    sp = parse_spec({**SPEC, "quality": {"max_mean_kld": 1.0, "suites": {"jargon": {"max_kld": 100.0}}}}, "two stages")
    said = []
    res = tune(str(tiny_dir), TuneConfig(spec=sp, max_bits=5.0, max_trials=1, quick=True, **FAST), record=False,
               say=said.append)
    t = res.trials[0]
    assert t.stage == "full" and t.passed, t.summary()
    assert len(calls) == 1, calls
    assert any("measured by the earlier stage, reused" in s for s in said)
    assert t.mean_kld is not None and [r for r in t.criteria if r["name"] == "mean KLD"]


def test_a_gate_reuses_divergence_only_under_the_same_eval_settings(tiny_dir, base, monkeypatch):
    from lowbit.eval import divergence

    cand = lowbit.quantize(lowbit.load(str(tiny_dir)), "int8")
    first = lowbit.gate(parse_spec(SPEC, "a"), base, cand, quick=True)
    calls = []
    monkeypatch.setattr(divergence, "compare", lambda *a, **k: calls.append(1) or first["divergence"])
    again = lowbit.gate(parse_spec(SPEC, "a"), base, cand, quick=True, reuse=first)
    assert calls == [] and again["divergence"] == first["divergence"]
    other = {**SPEC, "eval": {"samples": 3, "seq_len": 32}}
    lowbit.gate(parse_spec(other, "b"), base, cand, quick=True, reuse=first)
    assert calls == [1]  # other samples: measured again
    lowbit.gate(parse_spec(SPEC, "a"), base, cand, quick=False, reuse=first)
    assert calls == [1, 1]  # not quick: measured again
