"""Reading the user's YAML/JSON files (recipes, gate specs) with errors that name the file and fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError


def read_data_file(path: str | Path, what: str, hint: str) -> Any:
    """Parse a .json file as JSON and anything else as YAML. `what` names it ("recipe file")."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise LowbitError(f"{what} {p}: cannot be read ({e.strerror}); {hint}") from None
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise LowbitError(f"{what} {p}: is not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                          f"({str(e).splitlines()[0]}); fix the syntax") from None


def iter_jsonl(lines: list[str], where: str):
    """(line number, "<where> line N", object) for every non-blank line of a JSON-lines file; a line that
    is not JSON is a LowbitError naming it. `where` names the file ("eval file x.jsonl:")."""
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        at = f"{where} line {n}"
        try:
            yield n, at, json.loads(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{at}: not valid JSON ({e.msg} at column {e.colno}); "
                              f"fix: write one complete JSON object per line") from None
