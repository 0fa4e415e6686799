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


def bad_pair(token_agreement: float, json_asked: bool, cand_json_ok: bool | None, fb_json_ok: bool | None,
             min_agreement: float = 0.5) -> bool:
    """A shadow pair where the candidate's answer should have been replaced: it broke JSON the fallback
    got right, or it shares fewer than `min_agreement` of its tokens with the fallback's answer."""
    if json_asked and fb_json_ok and cand_json_ok is False:
        return True
    return token_agreement < min_agreement


def calibrate_floor(samples: list[tuple[float, bool]], max_false_pct: float = 2.0, min_pairs: int = 50) -> dict:
    """The --min-logprob floor from shadow pairs: samples of (candidate mean log-prob, bad pair).

    The floor flags answers whose mean log-prob is under it. It is the highest value that flags at most
    `max_false_pct` percent of the good answers (the fallbacks it costs); if no bad answer lies under
    it, confidence does not separate bad from good here and no floor is set (a floor would only cost
    fallbacks). Returns the floor (None when unset), the evidence, and why."""
    good = sorted(lp for lp, bad in samples if not bad)
    bad = sorted(lp for lp, b in samples if b)
    out = {"floor": None, "pairs": len(samples), "good": len(good), "bad": len(bad), "caught_bad_pct": None,
           "false_fallback_pct": None, "max_false_pct": max_false_pct}
    if len(samples) < min_pairs:
        return out | {"why": f"{len(samples)} of the {min_pairs} shadow pairs needed"}
    if not bad:
        return out | {"why": "no bad pair seen: no floor"}
    if not good:
        return out | {"why": "every scored pair is bad: the canary analysis, not a floor, should act"}
    k = int(max_false_pct / 100 * len(good))  # good answers the floor may flag
    floor = good[k] if k < len(good) else good[-1]
    caught = sum(lp < floor for lp in bad)
    if not caught:
        return out | {"why": f"no bad pair is less confident than the {max_false_pct:g}% least confident good "
                             f"ones: no floor"}
    false = sum(lp < floor for lp in good)
    return out | {"floor": floor, "caught_bad_pct": 100 * caught / len(bad), "false_fallback_pct": 100 * false / len(good),
                  "why": f"flags {caught} of {len(bad)} bad and {false} of {len(good)} good shadow answers"}
