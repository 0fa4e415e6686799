"""The SQLite run registry: record/list/get/compare round trip, default paths, errors, concurrent writers."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.report import compare_runs, default_db_path, get_run, headline, list_runs, record
from tests.report.test_report import bench_run, eval_run, full_run, gate_run


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "reg" / "runs.sqlite"


def test_record_get_round_trip(db, tmp_path):
    run = full_run()
    run_id = record(run, report_dir=tmp_path / "rep", db=db)
    got = get_run(run_id, db=db)
    assert got["run"] == run
    assert got["id"] == run_id and got["kind"] == "gate" and got["created"] == "2026-11-27T02:00:00Z"
    assert (got["baseline"], got["candidate"], got["recipe"]) == ("smollm2-135m", "smollm2-135m-w4-g128", "w4-g128")
    assert got["gate_passed"] is False
    assert got["ppl_change_pct"] == pytest.approx((13.97 - 13.42) / 13.42 * 100)
    assert got["mean_kld"] == pytest.approx(run["divergence"]["mean_kld"])
    assert got["top1"] == pytest.approx(0.953)
    assert got["decode_tok_s_ratio"] == pytest.approx(run["bench"]["ratios"]["decode_tok_s"])
    assert got["p95_latency_ratio"] == pytest.approx(run["bench"]["ratios"]["p95_latency"])
    assert got["report_path"] == str((tmp_path / "rep").resolve())


def test_list_newest_first_with_kind_filter_and_limit(db):
    ids = [record(r, db=db) for r in (eval_run(), bench_run(), gate_run(True), eval_run())]
    listed = list_runs(db=db)
    assert [r["id"] for r in listed] == ids[::-1]
    assert "run" not in listed[0] and "run_json" not in listed[0]
    assert [r["id"] for r in list_runs(kind="eval", db=db)] == [ids[3], ids[0]]
    assert len(list_runs(limit=2, db=db)) == 2
    assert list_runs(kind="gate", db=db)[0]["gate_passed"] is True


def test_headline_computed_when_ratios_absent():
    h = headline(bench_run())
    assert h["p95_latency_ratio"] == pytest.approx(1.1)
    assert h["decode_tok_s_ratio"] == pytest.approx(100 / 110)
    assert h["mean_kld"] is None and h["gate_passed"] is None


def test_headline_ppl_from_suite_when_no_divergence():
    run = {"kind": "eval", "suites": [{"name": "general", "metric": "ppl", "baseline": 10.0, "candidate": 11.0}]}
    assert headline(run)["ppl_change_pct"] == pytest.approx(10.0)


def test_compare_side_by_side(db):
    a, b = record(eval_run(), db=db), record(bench_run(), db=db)
    rows = compare_runs([b, a, b], db=db)
    by_metric = {r["metric"]: r for r in rows}
    assert list(by_metric["kind"]) == ["metric", str(b), str(a)]  # order given, repeats dropped
    assert by_metric["kind"][str(a)] == "eval" and by_metric["kind"][str(b)] == "bench"
    assert by_metric["ppl_change_pct"][str(a)] == pytest.approx(5.0)
    assert by_metric["ppl_change_pct"][str(b)] is None
    assert by_metric["p95_latency_ratio"][str(b)] == pytest.approx(1.1)


def test_missing_id_names_it_and_how_to_list(db):
    record(eval_run(), db=db)
    with pytest.raises(LowbitError, match=r"no run with id 42.*lowbit runs"):
        get_run(42, db=db)
    with pytest.raises(LowbitError, match="no run with id 7"):
        compare_runs([1, 7], db=db)


def test_bad_kind_is_refused(db):
    with pytest.raises(LowbitError, match="kind"):
        record({"kind": "nonsense"}, db=db)
    with pytest.raises(LowbitError, match="unknown kind"):
        list_runs(kind="evals", db=db)


def test_schema_version_table(db):
    record(eval_run(), db=db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(LowbitError, match="schema version 99 is newer"):
        list_runs(db=db)


def test_not_a_database(tmp_path):
    bad = tmp_path / "runs.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LowbitError, match="not a readable SQLite database"):
        list_runs(db=bad)


def test_default_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / "runs.sqlite"
    monkeypatch.delenv("LOWBIT_HOME")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert default_db_path() == tmp_path / "cache" / "runs.sqlite"
    run_id = record(eval_run())  # no db=: goes to the cache folder
    assert (tmp_path / "cache" / "runs.sqlite").is_file()
    assert get_run(run_id)["candidate"] == "cand-model"


def test_paths_and_numpy_values_are_stored(db, tmp_path):
    import numpy as np

    run = eval_run()
    run["baseline"]["path"] = tmp_path / "m"
    run["divergence"]["mean_kld"] = np.float32(0.25)
    got = get_run(record(run, db=db), db=db)
    assert got["run"]["baseline"]["path"] == str(tmp_path / "m")
    assert got["run"]["divergence"]["mean_kld"] == 0.25 and got["mean_kld"] == 0.25


def test_concurrent_writers(db):
    # Each record() opens its own connection, so threads contend for SQLite's file lock just as processes
    # would; they all start on a database that does not exist yet, so schema creation races too.
    barrier = threading.Barrier(4)

    def writer(w: int) -> list[int]:
        barrier.wait()
        return [record({"kind": "eval", "candidate": {"name": f"w{w}-{i}"}}, db=db) for i in range(15)]

    with ThreadPoolExecutor(4) as pool:
        ids = [i for got in pool.map(writer, range(4)) for i in got]
    assert len(set(ids)) == 60
    assert len(list_runs(limit=100, db=db)) == 60
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (1,)
