"""User-brought evals: your own prompts and checks in a JSONL file, scored on both models.

Format: one JSON object per line (blank lines are skipped), UTF-8:

    {"id": "refund-1",                 optional string; default "line<N>"; unique in the file
     "prompt": "...",                  required, non-empty string
     "expected": "...",                optional string
     "check": {"type": T, "value": V}, optional
     "max_new_tokens": 64}             optional positive integer; default 128

    T = "exact"        V string: the output, stripped of surrounding whitespace, equals V (stripped)
        "contains"     V string: V occurs in the output (case-sensitive)
        "regex"        V string: re.search(V, output) finds a match; anchor with ^...$, flags inline: (?i)
        "json_schema"  V object: the output's JSON (the whole output, else the first object or array in it,
                       code fences and surrounding text allowed) validates against the JSON schema V

Without "check", an "expected" string means {"type": "exact", "value": expected} (with a check,
"expected" is for the reader only). With neither, the
item measures agreement: the candidate passes when its output equals the baseline's (the baseline
always passes such items).

Example lines:

    {"prompt": "What is 2+2? Answer with a number only.", "expected": "4"}
    {"prompt": "Name a primary colour.", "check": {"type": "regex", "value": "(?i)red|blue|yellow"}}
    {"prompt": "Paris as JSON with a city field.", "check": {"type": "json_schema", "value": {"required": ["city"]}}}
    {"prompt": "Summarise: the meeting moved to Friday."}

Both models decode greedily from the prompt sent through the model's chat template (one user turn),
or the plain prompt when the tokenizer has none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema

from lowbit.datafile import iter_jsonl
from lowbit.errors import LowbitError
from lowbit.eval.suites.tool_calling import GenerateFn, greedy, json_values
from lowbit.eval.types import Case, SuiteResult
from lowbit.runtime.generate import encode_prompt

CHECK_TYPES = ("regex", "json_schema", "exact", "contains")
FIELDS = ("id", "prompt", "expected", "check", "max_new_tokens")
DEFAULT_MAX_NEW_TOKENS = 128
QUICK_ITEMS = 5
MAX_WORST = 10
SHOW_CHARS = 240


# -- loading ----------------------------------------------------------------------------------------
def _check(raw, where: str) -> dict:
    """The validated check of one line: {"type", "value"}."""
    if not isinstance(raw, dict):
        raise LowbitError(f"{where}: field 'check' must be an object like {{\"type\": \"regex\", \"value\": \"...\"}}")
    kind, value = raw.get("type"), raw.get("value")
    if kind not in CHECK_TYPES:
        raise LowbitError(f"{where}: field 'check.type' is {kind!r}; fix: use one of {', '.join(CHECK_TYPES)}")
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise LowbitError(f"{where}: field 'check.value' must be a JSON schema object for type 'json_schema'")
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as e:
            raise LowbitError(f"{where}: field 'check.value' is not a valid JSON schema ({e.message}); "
                              f"fix: correct the schema") from None
    elif not isinstance(value, str):
        raise LowbitError(f"{where}: field 'check.value' must be a string for type '{kind}'")
    elif kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise LowbitError(f"{where}: field 'check.value' is not a valid regular expression ({e}); "
                              f"fix: escape special characters such as ( [ + * ? with a backslash") from None
    return {"type": kind, "value": value}


def _item(obj, where: str, line: int) -> dict:
    """One validated line: {"id", "prompt", "check" (None: agree with the baseline), "max_new_tokens"}."""
    if not isinstance(obj, dict):
        raise LowbitError(f"{where}: must be a JSON object like {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:  # a misspelt "expected" would silently turn the item into an agreement check
        raise LowbitError(f"{where}: unknown field '{unknown[0]}'; fix: use only {', '.join(FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LowbitError(f"{where}: field 'prompt' is missing or empty; fix: give the prompt as a non-empty string")
    item_id = obj.get("id", f"line{line}")
    if not isinstance(item_id, str) or not item_id:
        raise LowbitError(f"{where}: field 'id' must be a non-empty string")
    expected = obj.get("expected")
    if expected is not None and not isinstance(expected, str):
        raise LowbitError(f"{where}: field 'expected' must be a string")
    max_new = obj.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise LowbitError(f"{where}: field 'max_new_tokens' is {max_new!r}; fix: give a positive integer")
    if "check" in obj:
        check = _check(obj["check"], where)
    else:
        check = {"type": "exact", "value": expected} if expected is not None else None
    return {"id": item_id, "prompt": prompt, "check": check, "max_new_tokens": max_new, "line": line}


def load_items(path: str | Path) -> list[dict]:
    """Every item of a user eval file, validated; errors name the file, line, field and fix."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LowbitError(f"eval file {path}: does not exist; fix: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"eval file {path}: cannot be read ({e}); fix: save it as UTF-8 JSON lines") from None
    items, seen = [], {}
    for n, where, obj in iter_jsonl(lines, f"eval file {path}:"):
        item = _item(obj, where, n)
        if item["id"] in seen:
            raise LowbitError(f"{where}: field 'id' {item['id']!r} repeats line {seen[item['id']]}; fix: make ids unique")
        seen[item["id"]] = n
        items.append(item)
    if not items:
        raise LowbitError(f"eval file {path}: no prompts; fix: add lines like {{\"prompt\": \"...\", \"expected\": \"...\"}}")
    return items


# -- checks -----------------------------------------------------------------------------------------
_NO_JSON = object()


def _first_json(text: str):
    """The JSON value of an output: the whole text if it parses, else the first object or array in it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return next(json_values(text), _NO_JSON)


def check_output(check: dict, output: str) -> bool:
    """Does one output pass a (validated) check?"""
    kind, value = check["type"], check["value"]
    if kind == "exact":
        return output.strip() == value.strip()
    if kind == "contains":
        return value in output
    if kind == "regex":
        return re.search(value, output) is not None
    data = _first_json(output)
    return data is not _NO_JSON and jsonschema.validators.validator_for(value)(value).is_valid(data)


# -- the suite --------------------------------------------------------------------------------------
def _short(text: str, n: int = SHOW_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _pct(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def _outputs(loaded, items: list[dict], generate_fn: GenerateFn) -> list[str]:
    return [generate_fn(loaded, encode_prompt(loaded.tokenizer, it["prompt"], chat=True), it["max_new_tokens"])
            for it in items]


def run(baseline, candidate, path: str | Path, quick: bool = False, generate_fn: GenerateFn | None = None) -> SuiteResult:
    """Score both models (lowbit.Model handles) on a user eval file; headline pass_pct.

    generate_fn(loaded, inputs, max_new_tokens) -> text replaces the greedy model call (tests).
    quick: only the first 5 items.
    """
    path = Path(path)
    items = load_items(path)
    if quick:
        items = items[:QUICK_ITEMS]
    generate_fn = generate_fn or greedy
    base_out, cand_out = _outputs(baseline, items, generate_fn), _outputs(candidate, items, generate_fn)
    agree = [b.strip() == c.strip() for b, c in zip(base_out, cand_out)]
    base_pass = [True if it["check"] is None else check_output(it["check"], out) for it, out in zip(items, base_out)]
    cand_pass = [a if it["check"] is None else check_output(it["check"], out)
                 for it, out, a in zip(items, cand_out, agree)]

    worst = [Case(id=it["id"], text=_short(it["prompt"]), baseline=_short(b), candidate=_short(c),
                  score=2.0 if bp else 1.0)  # a regression (the baseline passed) ranks first
             for it, b, c, bp, cp in zip(items, base_out, cand_out, base_pass, cand_pass) if not cp]
    worst = sorted(worst, key=lambda c: -c.score)[:MAX_WORST]
    kinds = [it["check"]["type"] if it["check"] else "agreement" for it in items]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
    metrics = {"pass_pct": {"baseline": _pct(base_pass), "candidate": _pct(cand_pass)},
               "agreement_with_baseline_pct": {"baseline": 100.0, "candidate": _pct(agree)}}
    return SuiteResult(name=f"user:{path.name}", metric="pass_pct", baseline=metrics["pass_pct"]["baseline"],
                       candidate=metrics["pass_pct"]["candidate"], higher_is_better=True, n=len(items),
                       metrics=metrics, worst=worst, notes=f"{path}: {len(items)} items ({counts}), greedy")
