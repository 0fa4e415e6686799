"""A SQLite registry of runs: each run's headline numbers as columns (to list and compare) plus its full JSON.

The database lives at $LOWBIT_HOME/runs.sqlite, else in the cache folder (LOWBIT_CACHE or
~/.cache/lowbit). Every write is one `BEGIN IMMEDIATE` transaction and connections wait for a busy
database (sqlite timeout), so several processes can record runs at once.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from lowbit.errors import LowbitError
from lowbit.report.markdown import is_num

SCHEMA_VERSION = 1
KINDS = ("eval", "gate", "bench", "serve")  # serve: `lowbit serve` shadow scores and canary decisions
BUSY_TIMEOUT_S = 30.0
HEADLINE = ("mean_kld", "ppl_change_pct", "top1", "gate_passed", "p95_latency_ratio", "decode_tok_s_ratio")
LISTED = ("id", "kind", "created", "baseline", "candidate", "recipe", *HEADLINE, "report_path")

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    created TEXT NOT NULL,
    baseline TEXT,
    candidate TEXT,
    recipe TEXT,
    mean_kld REAL,
    ppl_change_pct REAL,
    top1 REAL,
    gate_passed INTEGER,
    p95_latency_ratio REAL,
    decode_tok_s_ratio REAL,
    report_path TEXT,
    run_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_kind ON runs (kind, id);
"""


def default_db_path() -> Path:
    if os.environ.get("LOWBIT_HOME"):
        return Path(os.environ["LOWBIT_HOME"]) / "runs.sqlite"
    from lowbit.model.sources import cache_root  # imported here: the model layer is only needed for this

    return cache_root() / "runs.sqlite"


@contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; IMMEDIATE takes the write lock up front, so concurrent writers queue
    on the busy timeout instead of failing halfway with 'database is locked'."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _schema_version(conn: sqlite3.Connection) -> int | None:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone():
        return None
    return conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = _schema_version(conn)
    if version is None:
        with _write(conn):
            version = _schema_version(conn)  # another process may have created it while we waited
            if version is None:
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    conn.execute(stmt)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                version = SCHEMA_VERSION
    if version > SCHEMA_VERSION:
        raise LowbitError(f"run registry {path}: schema version {version} is newer than this lowbit reads "
                          f"({SCHEMA_VERSION}); fix: upgrade lowbit, or set LOWBIT_HOME to another folder")


@contextmanager
def _connect(db: Path | None) -> Iterator[sqlite3.Connection]:
    path = Path(db) if db is not None else default_db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)  # we issue BEGIN/COMMIT
    except (OSError, sqlite3.Error) as e:
        raise LowbitError(f"run registry {path}: cannot open it ({e}); fix: set LOWBIT_HOME to a writable folder") from e
    with closing(conn):
        conn.row_factory = sqlite3.Row
        try:
            _ensure_schema(conn, path)
        except sqlite3.DatabaseError as e:
            raise LowbitError(f"run registry {path}: not a readable SQLite database ({e}); "
                              "fix: move the file away, or set LOWBIT_HOME to another folder") from e
        yield conn


# ---- headline numbers -------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    return float(x) if is_num(x) and math.isfinite(x) else None


def _ratio(ratios: dict, key: str, base: Any, cand: Any) -> float | None:
    """The ratio the bench stored, else candidate / baseline."""
    if _num(ratios.get(key)) is not None:
        return float(ratios[key])
    base, cand = _num(base), _num(cand)
    return cand / base if base and cand is not None else None


def headline(run: dict) -> dict[str, Any]:
    """The numbers a listing shows; None where the run does not carry them."""
    div, bench, gate = run.get("divergence") or {}, run.get("bench") or {}, run.get("gate") or {}
    base_ppl, cand_ppl = _num(div.get("ppl_baseline")), _num(div.get("ppl_candidate"))
    if base_ppl is None:  # an eval without the divergence pass may still carry a perplexity suite
        suite = next((s for s in run.get("suites") or [] if s.get("metric") == "ppl"), {})
        base_ppl, cand_ppl = _num(suite.get("baseline")), _num(suite.get("candidate"))
    b, c = bench.get("baseline") or {}, bench.get("candidate") or {}
    ratios = bench.get("ratios") or {}
    return {
        "mean_kld": _num(div.get("mean_kld")),
        "ppl_change_pct": (cand_ppl - base_ppl) / base_ppl * 100 if base_ppl and cand_ppl is not None else None,
        "top1": _num(div.get("top1")),
        "gate_passed": bool(gate["passed"]) if "passed" in gate else None,
        "p95_latency_ratio": _ratio(ratios, "p95_latency", (b.get("latency_ms") or {}).get("p95"),
                                    (c.get("latency_ms") or {}).get("p95")),
        "decode_tok_s_ratio": _ratio(ratios, "decode_tok_s", b.get("decode_tok_s"), c.get("decode_tok_s")),
    }


def _jsonable(x: Any) -> Any:
    """Paths and numpy scalars sneak into run dicts; store them as their plain values."""
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _row_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = {k: row[k] for k in LISTED}
    d["gate_passed"] = None if d["gate_passed"] is None else bool(d["gate_passed"])
    return d


# ---- public functions -------------------------------------------------------------------------


def record(run: dict, report_dir: Path | None = None, db: Path | None = None) -> int:
    """Store a run; returns its id."""
    kind = run.get("kind") if isinstance(run, dict) else None
    if kind not in KINDS:
        raise LowbitError(f"run registry: the run's 'kind' is {kind!r}; fix: set it to one of {', '.join(KINDS)}")
    cand = run.get("candidate") or {}
    values = {
        "kind": kind,
        "created": run.get("created") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "baseline": (run.get("baseline") or {}).get("name"),
        "candidate": cand.get("name"),
        "recipe": cand.get("recipe") if isinstance(cand.get("recipe"), str) or cand.get("recipe") is None
        else json.dumps(cand["recipe"], default=_jsonable),
        **headline(run),
        "report_path": str(Path(report_dir).resolve()) if report_dir is not None else None,
        "run_json": json.dumps(run, default=_jsonable),
    }
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    with _connect(db) as conn:
        with _write(conn):
            cur = conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", list(values.values()))
        return int(cur.lastrowid)


def list_runs(limit: int = 20, kind: str | None = None, db: Path | None = None) -> list[dict]:
    """The most recent runs first, headline columns only."""
    if kind is not None and kind not in KINDS:
        raise LowbitError(f"run registry: unknown kind {kind!r}; fix: use one of {', '.join(KINDS)}")
    where, args = ("WHERE kind = ?", [kind]) if kind else ("", [])
    with _connect(db) as conn:
        rows = conn.execute(f"SELECT {', '.join(LISTED)} FROM runs {where} ORDER BY id DESC LIMIT ?",
                            [*args, int(limit)]).fetchall()
    return [_row_dict(r) for r in rows]


def _missing(run_id: Any, conn: sqlite3.Connection) -> LowbitError:
    path = conn.execute("PRAGMA database_list").fetchone()["file"]
    return LowbitError(f"run registry {path}: no run with id {run_id}; fix: list the recorded ids with "
                       "`lowbit runs` (newest first)")


def get_run(run_id: int, db: Path | None = None) -> dict:
    """The listing columns plus "run": the full run dict as recorded."""
    with _connect(db) as conn:
        row = conn.execute(f"SELECT {', '.join(LISTED)}, run_json FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise _missing(run_id, conn)
    return {**_row_dict(row), "run": json.loads(row["run_json"])}


def compare_runs(ids: list[int], db: Path | None = None) -> list[dict]:
    """One row per field ({"metric": name, "<id>": value, ...}), the runs side by side in the order given."""
    ids = list(dict.fromkeys(ids))  # a repeated id would only repeat a column
    with _connect(db) as conn:
        found = {}
        for run_id in ids:
            row = conn.execute(f"SELECT {', '.join(LISTED)} FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise _missing(run_id, conn)
            found[run_id] = _row_dict(row)
    fields = [f for f in LISTED if f not in ("id", "report_path")]
    return [{"metric": f, **{str(i): found[i][f] for i in ids}} for f in fields]
