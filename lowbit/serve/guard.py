"""When the candidate's answer is not good enough: the checks that send a request to the fallback.

A router that only falls back on exceptions lets an HTTP 200 carrying broken JSON through as a
success; here the answer itself is checked: it must parse (and validate, when a schema was given)
when JSON was asked for, and its mean token log-probability must not be under the threshold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lowbit.datafile import check_user_schema, schema_is_valid
from lowbit.errors import LowbitError

# why an answer came from the model it came from (the x-lowbit-reason header)
ROUTED = "canary"  # the canary share sent it to the candidate, and it passed the checks
ROUTED_FALLBACK = "routed"  # the canary share sent it to the fallback
PINNED = "pinned"  # the request named one model
ERROR, TIMEOUT, BUSY = "candidate_error", "candidate_timeout", "candidate_busy"
JSON_INVALID, SCHEMA_INVALID, LOW_CONFIDENCE = "json_invalid", "schema_invalid", "low_confidence"

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


@dataclass(frozen=True)
class JsonAsk:
    """What response_format asked for: any JSON object, or one valid against `schema`."""
    schema: dict | None = None
    name: str = ""


def parse_response_format(rf: Any) -> JsonAsk | None:
    """response_format -> JsonAsk (None for plain text); a malformed one is a LowbitError naming the field."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise LowbitError("response_format: must be an object with a 'type' (text, json_object or json_schema)")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonAsk()
    if kind != "json_schema":
        raise LowbitError(f"response_format.type: {kind!r} is unknown; fix: use text, json_object or json_schema")
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise LowbitError("response_format.json_schema.schema: missing or not an object; fix: send "
                          "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    schema = js["schema"]
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise LowbitError(f"response_format.json_schema.schema: not a valid JSON schema ({e.message}); "
                          f"fix: correct the schema at {'/'.join(map(str, e.path)) or 'its top level'}") from None
    check_user_schema(schema, "response_format.json_schema.schema")
    return JsonAsk(schema, str(js.get("name") or ""))


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """(parsed, value): the whole answer, less surrounding space and one ``` fence, as one JSON value."""
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    try:
        return True, json.loads(s)
    except (ValueError, RecursionError):
        return False, None


def json_problem(text: str, ask: JsonAsk) -> str | None:
    """None when the answer is what was asked for, else JSON_INVALID or SCHEMA_INVALID."""
    ok, value = parse_json_answer(text)
    if not ok or (ask.schema is None and not isinstance(value, dict)):
        return JSON_INVALID
    if ask.schema is not None:
        try:
            if not schema_is_valid(ask.schema, value, "response_format.json_schema.schema"):
                return SCHEMA_INVALID
        except LowbitError:
            return SCHEMA_INVALID
    return None


def problem(result, ask: JsonAsk | None, min_mean_logprob: float | None) -> str | None:
    """Why a candidate's (finished) answer should be replaced by the fallback's, or None."""
    if ask is not None:
        why = json_problem(result.text, ask)
        if why:
            return why
    mean = result.mean_logprob
    if min_mean_logprob is not None and mean is not None and mean < min_mean_logprob:
        return LOW_CONFIDENCE
    return None
