"""The recommended gate spec: lowbit's default gate with the scenario's and tasks' fragments merged in."""

from __future__ import annotations

from typing import Any

import yaml

from lowbit.eval.gate import DEFAULT_SPEC, parse_spec


def _stricter(section: str, key: str, old: Any, new: Any) -> Any:
    """When two sources set one criterion, the stricter threshold stays; eval/bench settings: the later."""
    if section in ("eval", "bench") or not all(isinstance(v, (int, float)) for v in (old, new)):
        return new
    return min(old, new) if key.startswith("max_") else max(old, new)


def merge_spec(base: dict, fragment: dict, section: str = "") -> dict:
    out = dict(base)
    for key, val in fragment.items():
        where = section or key
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge_spec(out[key], val, where)
        elif key in out and not isinstance(val, dict):
            out[key] = _stricter(where, key, out[key], val)
        else:
            out[key] = val
    return out


def build_spec(fragments: list[tuple[str, dict]], runtime: str) -> tuple[str, list[str]]:
    """lowbit's default gate with the fragments merged in, as YAML text that parse_spec accepts."""
    data = yaml.safe_load(DEFAULT_SPEC)
    for _, frag in fragments:
        data = merge_spec(data, frag)
    notes = []
    if runtime != "lowbit" and ("latency" in data or "bench" in data):
        data.pop("latency", None)
        data.pop("bench", None)
        notes.append(f"the spec has no latency section: lowbit bench times lowbit's own CPU runtime, not {runtime}; "
                     f"measure speed in {runtime} itself")
    parse_spec(data, "recommended spec")
    head = ["# Gate spec written by `lowbit recommend`: lowbit's default gate (lowbit/eval/gate.py)",
            "# plus " + ", ".join(name for name, _ in fragments) + "; where two set one criterion the stricter stays.",
            "# Format: docs/gate.md. Edit the thresholds to your needs."]
    text = "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return text, notes
