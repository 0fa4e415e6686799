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

Limits (checked before the bulk read or the model run, each named in its error): the file at most
MAX_FILE_BYTES (20 MB), MAX_LINES (10,000) lines and MAX_FILE_VALUES (1,000,000) JSON values; its
distinct JSON schemas MAX_SCHEMA_VALUES (20,000) values together; a line at most MAX_LINE_CHARS (1 MB),
nested at most 64 deep; a prompt at most MAX_PROMPT_CHARS (100,000) characters; max_new_tokens at
most MAX_NEW_TOKENS (4096). A regex is Python `re` syntax, at most 1000 characters, run with the
`regex` package under a 1 s timeout per output; a JSON schema is resolved offline only (a `$ref`
must be internal, "#/..."), and its `pattern`s are regexes as above.

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
from pathlib import Path

import jsonschema

from lowbit.datafile import (check_user_schema, decode_utf8, iter_jsonl, nesting, read_bounded, regex_search,
                             schema_is_valid, user_regex)
from lowbit.errors import LowbitError
from lowbit.eval.suites.tool_calling import GenerateFn, greedy, json_values
from lowbit.eval.types import Case, SuiteResult
from lowbit.runtime.generate import encode_prompt

CHECK_TYPES = ("regex", "json_schema", "exact", "contains")
FIELDS = ("id", "prompt", "expected", "check", "max_new_tokens")
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS = 4096
MAX_FILE_BYTES = 20_000_000  # a suite of 10,000 prompts of 2 KB; a bigger file is refused before it is read
MAX_LINES = 10_000
MAX_LINE_CHARS = 1_000_000
MAX_FILE_VALUES = 1_000_000  # JSON values in the whole file (schema nodes, mostly): bounds load and check time
MAX_PROMPT_CHARS = 100_000
# JSON values in the file's distinct schemas together: checking a schema against its meta-schema costs
# about 0.2 ms per subschema, so this bounds the load to a few seconds (repeated schemas count once)
MAX_SCHEMA_VALUES = 20_000
QUICK_ITEMS = 5
MAX_WORST = 10
SHOW_CHARS = 240


# -- loading ----------------------------------------------------------------------------------------
def _check(raw, where: str, schemas: dict | None = None) -> dict:
    """The validated check of one line: {"type", "value"}. `schemas` (canonical JSON -> True) remembers
    the schemas already checked in this file, and their total size."""
    if not isinstance(raw, dict):
        raise LowbitError(f"{where}: field 'check' must be an object like {{\"type\": \"regex\", \"value\": \"...\"}}")
    kind, value = raw.get("type"), raw.get("value")
    if kind not in CHECK_TYPES:
        raise LowbitError(f"{where}: field 'check.type' is {kind!r}; fix: use one of {', '.join(CHECK_TYPES)}")
    if kind == "json_schema":
        if not isinstance(value, dict):
            raise LowbitError(f"{where}: field 'check.value' must be a JSON schema object for type 'json_schema'")
        schemas = {} if schemas is None else schemas
        key = json.dumps(value, sort_keys=True)
        if key in schemas:  # the same schema as an earlier line: already checked
            return {"type": kind, "value": value}
        schemas[key] = True
        schemas[None] = schemas.get(None, 0) + nesting(value)[1]
        if schemas[None] > MAX_SCHEMA_VALUES:
            raise LowbitError(f"{where}: field 'check.value': the file's distinct JSON schemas hold more than "
                              f"{MAX_SCHEMA_VALUES:,} values together, over the limit; fix: reuse one schema for "
                              f"similar items, or split the file")
        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as e:
            raise LowbitError(f"{where}: field 'check.value' is not a valid JSON schema ({e.message}); "
                              f"fix: correct the schema") from None
        except RecursionError:
            raise LowbitError(f"{where}: field 'check.value' is nested too deeply; fix: flatten the schema") from None
        check_user_schema(value, f"{where}: field 'check.value'")  # offline refs only, safe regexes
    elif not isinstance(value, str):
        raise LowbitError(f"{where}: field 'check.value' must be a string for type '{kind}'")
    elif kind == "regex":
        user_regex(value, f"{where}: field 'check.value'")
    return {"type": kind, "value": value}


def _item(obj, where: str, line: int, schemas: dict | None = None) -> dict:
    """One validated line: {"id", "prompt", "check" (None: agree with the baseline), "max_new_tokens"}."""
    if not isinstance(obj, dict):
        raise LowbitError(f"{where}: must be a JSON object like {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:  # a misspelt "expected" would silently turn the item into an agreement check
        raise LowbitError(f"{where}: unknown field '{unknown[0]}'; fix: use only {', '.join(FIELDS)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LowbitError(f"{where}: field 'prompt' is missing or empty; fix: give the prompt as a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise LowbitError(f"{where}: field 'prompt' is {len(prompt):,} characters, over the limit of "
                          f"{MAX_PROMPT_CHARS:,}; fix: shorten it")
    item_id = obj.get("id", f"line{line}")
    if not isinstance(item_id, str) or not item_id:
        raise LowbitError(f"{where}: field 'id' must be a non-empty string")
    expected = obj.get("expected")
    if expected is not None and not isinstance(expected, str):
        raise LowbitError(f"{where}: field 'expected' must be a string")
    max_new = obj.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS:
        raise LowbitError(f"{where}: field 'max_new_tokens' is {max_new!r}; fix: give a whole number from 1 to {MAX_NEW_TOKENS}")
    if "check" in obj:
        check = _check(obj["check"], where, schemas)
    else:
        check = {"type": "exact", "value": expected} if expected is not None else None
    return {"id": item_id, "prompt": prompt, "check": check, "max_new_tokens": max_new, "line": line}


def load_items(path: str | Path) -> list[dict]:
    """Every item of a user eval file, validated; errors name the file, line, field and fix."""
    path = Path(path)
    raw = read_bounded(path, "eval file", MAX_FILE_BYTES, "fix: give a UTF-8 JSON-lines file",
                       missing=f"eval file {path}: does not exist; fix: check the path")
    n_lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
    if n_lines > MAX_LINES:
        raise LowbitError(f"eval file {path}: {n_lines:,} lines, over the limit of {MAX_LINES:,}; fix: split it into "
                          f"several files")
    lines = decode_utf8(raw, "eval file", path).split("\n")  # not splitlines(): U+2028 may sit inside a string
    del raw
    items, seen, schemas = [], {}, {}
    for n, where, obj in iter_jsonl(lines, f"eval file {path}:", max_line_chars=MAX_LINE_CHARS, max_nodes=MAX_FILE_VALUES):
        item = _item(obj, where, n, schemas)
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


def check_output(check: dict, output: str, where: str = "eval check") -> bool:
    """Does one output pass a (validated) check? `where` names the file and line for errors: a regex
    that times out, a schema $ref that is not in the schema (never fetched)."""
    kind, value = check["type"], check["value"]
    if kind == "exact":
        return output.strip() == value.strip()
    if kind == "contains":
        return value in output
    if kind == "regex":
        return regex_search(value, output, f"{where}: field 'check.value'")
    data = _first_json(output)
    if data is _NO_JSON:
        return False
    return schema_is_valid(value, data, f"{where}: field 'check.value'")


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
    def passes(it: dict, out: str) -> bool:
        return check_output(it["check"], out, f"eval file {path}: line {it['line']}")

    base_pass = [True if it["check"] is None else passes(it, out) for it, out in zip(items, base_out)]
    cand_pass = [a if it["check"] is None else passes(it, out) for it, out, a in zip(items, cand_out, agree)]

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
