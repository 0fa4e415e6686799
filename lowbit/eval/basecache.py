"""The baseline's side of an evaluation, kept on disk between runs.

A gate compares many candidates with one baseline, and the baseline's side of every measurement
(its log-probs on the divergence samples, its answers to the suites' prompts) is the same each
time. It is cached under `~/.cache/lowbit/baseline-logits/`, keyed by what decides it:

- the baseline's identity: the sha256 of its float weights and its dtype. Only a float model that
  was not quantized is cached; an artifact or a model quantized in memory carries its float
  source's sha256, which does not identify its own weights, so it is always recomputed;
- the measurement: its name, every parameter that changes it, and CACHE_VERSION (raised whenever a
  suite changes what it stores);
- torch's and transformers' versions.

A damaged or unreadable entry is recomputed, never trusted; entries are written to a temporary
name and renamed into place. LOWBIT_NO_BASELINE_CACHE=1 turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_VERSION = 1


def baseline_key(model) -> str | None:
    """What identifies a baseline's outputs, or None when they must not be cached (see the module doc)."""
    src = getattr(model, "source", None) or {}
    sha = src.get("sha256")
    if not sha or getattr(model, "meta", None) or getattr(model, "plan", None) is not None:
        return None
    from lowbit.model.qlinear import QEmbedding, QLinear

    module = getattr(model, "module", model)
    if any(isinstance(m, (QLinear, QEmbedding)) for m in module.modules()):
        return None
    p = next(module.parameters(), None)
    return f"{sha}|{p.dtype if p is not None else '?'}|kv {getattr(model, 'kv_cache', 'none')}"


def cache_dir() -> Path:
    from lowbit.model.sources import cache_root

    return cache_root() / "baseline-logits"


def _versions() -> str:
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "?"
    return f"torch {torch.__version__}, transformers {tf}"


def _path(kind: str, model, params: dict) -> Path | None:
    key = baseline_key(model)
    if key is None or os.environ.get("LOWBIT_NO_BASELINE_CACHE", "") not in ("", "0"):
        return None
    blob = json.dumps({"kind": kind, "params": params, "model": key, "v": CACHE_VERSION, "lib": _versions()},
                      sort_keys=True, default=str)
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.pt"


def lookup(kind: str, model, params: dict) -> Any:
    """The stored result of this measurement on this baseline, or None (not cacheable, absent, damaged)."""
    path = _path(kind, model, params)
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged entry is recomputed, never trusted
            pass
    return None


def store(kind: str, model, params: dict, value: Any) -> None:
    path = _path(kind, model, params)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        torch.save(value, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache costs time, not the result
        pass


def cached(kind: str, model, params: dict, compute: Callable[[], Any]) -> Any:
    """compute() of the baseline `model`, or the stored result of the same measurement on the same
    baseline. `params` (JSON-serializable) must hold everything else that changes the result; the
    result may hold tensors, lists, dicts, strings and numbers (not None)."""
    value = lookup(kind, model, params)
    if value is None:
        value = compute()
        store(kind, model, params, value)
    return value
