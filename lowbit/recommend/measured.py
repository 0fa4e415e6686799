"""The numbers measured here: a model's runs in the run registry (lowbit.report.registry)."""

from __future__ import annotations

from pathlib import Path
from lowbit.recommend.modelinfo import ModelInfo


def _same_model(run: dict, info: ModelInfo) -> bool:
    base, cand = run.get("baseline") or {}, run.get("candidate") or {}
    if info.kind == "lowbit" and cand.get("path") and str(Path(cand["path"]).resolve()) in info.source_paths:
        return True
    if base.get("name") not in info.source_names:
        return False
    if info.kind == "bundled":
        return base.get("kind") == "bundled"
    if base.get("path") and str(Path(base["path"]).resolve()) in info.source_paths:
        return True
    # a GGUF baseline is recorded with its converted folder as path: compare the file's sha256 instead
    return info.kind == "gguf" and base.get("kind") == "gguf" and base.get("sha256") == _gguf_sha(info)


def _gguf_sha(info: ModelInfo) -> str | None:
    from lowbit.model.sources import sha256_memo

    try:
        return sha256_memo([info.path])
    except OSError:
        return None


def measured_runs(info: ModelInfo, db: Path | None = None, limit: int = 200) -> list[dict]:
    """The registry's runs of this model (newest first), as the rows the recommendation lists."""
    from lowbit.report.registry import get_run, list_runs

    rows = []
    for row in list_runs(limit=limit, kind=None, db=db):
        if row["baseline"] not in info.source_names and not (info.kind == "lowbit" and row["candidate"] == info.name):
            continue
        run = get_run(row["id"], db=db)["run"]
        if not _same_model(run, info):
            continue
        cand, base = run.get("candidate") or {}, run.get("baseline") or {}
        wb = cand.get("weight_bytes")
        params = info.parameters
        rows.append({"run_id": row["id"], "kind": row["kind"], "created": row["created"], "candidate": row["candidate"],
                     "recipe": row["recipe"], "weight_bytes": wb,
                     "size_vs_baseline": wb / base["weight_bytes"] if wb and base.get("weight_bytes") else None,
                     "bits_per_weight": 8 * wb / params if wb and params else None,
                     "mean_kld": row["mean_kld"], "ppl_change_pct": row["ppl_change_pct"], "top1": row["top1"],
                     "gate_passed": row["gate_passed"], "decode_speedup": row["decode_tok_s_ratio"]})
    return rows
