"""Tool calling: does the candidate still emit a well-formed function call for a question?

Data: the Berkeley Function Calling Leaderboard (BFCL v4) questions shipped in the PyPI package
`bfcl-eval`, read by path (the package is never imported: it pulls in heavy dependencies).
Categories "simple_python" (one function offered) and "multiple" (2-4 offered, one is right); each
line holds a question, the functions as JSON schema (with BFCL's own type names), and a
possible-answer file gives the accepted argument values.

Both models answer the same prompts greedily. From each output the first JSON object that looks like
a call is extracted and scored: json_valid (a call was found), schema_valid (the function exists and
the arguments validate against its parameters), agreement with the baseline's call, and a match
against BFCL's accepted values.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import referencing.exceptions
import torch

from lowbit.data.corpora import package_file
from lowbit.datafile import schema_validator
from lowbit.errors import LowbitError
from lowbit.eval.types import Case, SuiteResult
from lowbit.runtime.generate import greedy_batch

INSTALL = "pip install --no-deps bfcl-eval==2026.3.23"
CATEGORIES = ("simple_python", "multiple")
MAX_WORST = 10
SHOW_CHARS = 240
# the baseline must write at least this share of schema-valid calls (and at least one) for a drop to be
# seen; under it the candidate is not asked and the suite's criteria read "not applicable"
MIN_BASELINE_VALID = 0.25

# (lowbit.Model handle, tokenized prompt, max_new_tokens) -> the generated text
GenerateFn = Callable[[Any, dict, int], str]


# -- data -------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"data file {path}: cannot be read ({e}); fix: reinstall it ({INSTALL})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise LowbitError(f"data file {path}: line {i} is not valid JSON ({e}); the file is damaged; "
                              f"fix: reinstall it ({INSTALL})") from None
    return rows


def _category(cat: str) -> list[dict]:
    questions = _read_jsonl(package_file("bfcl_eval", f"data/BFCL_v4_{cat}.json", INSTALL))
    answers_path = package_file("bfcl_eval", f"data/possible_answer/BFCL_v4_{cat}.json", INSTALL)
    answers = {a.get("id"): a.get("ground_truth") for a in _read_jsonl(answers_path)}
    out = []
    for q in questions:
        try:
            messages = q["question"][0]  # single-turn categories: one conversation
            user = next(m["content"] for m in messages if m["role"] == "user")
            out.append({"id": q["id"], "category": cat, "question": user, "messages": messages,
                        "functions": q["function"], "answer": answers.get(q["id"])})
        except (KeyError, IndexError, TypeError, StopIteration):
            raise LowbitError(f"data file for BFCL category '{cat}': question {q.get('id', '?')} lacks "
                              f"'question' or 'function'; fix: reinstall it ({INSTALL})") from None
    return out


def load_questions(n: int, seed: int = 0, categories: tuple[str, ...] = CATEGORIES) -> list[dict]:
    """n BFCL questions drawn reproducibly: {id, category, question, messages, functions, answer}.

    answer is BFCL's possible answer ([{function name: {argument: [accepted values]}}]) or None.
    """
    pool = [q for cat in categories for q in _category(cat)]
    if n >= len(pool):
        return pool
    return random.Random(seed).sample(pool, n)


# -- schemas ----------------------------------------------------------------------------------------
# BFCL writes Python type names; JSON schema has its own ("any" means no constraint).
_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "str": "string",
             "int": "integer", "bool": "boolean"}


def _map_type(t):
    if isinstance(t, list):
        mapped = [_map_type(x) for x in t]
        return None if None in mapped else mapped
    return None if t == "any" else _TYPE_MAP.get(t, t)


def to_json_schema(schema: dict) -> dict:
    """A BFCL parameter schema as standard JSON schema (recursively)."""
    out = {k: v for k, v in schema.items() if k != "optional"}  # "optional" is BFCL-only
    if "type" in schema:
        t = _map_type(schema["type"])
        if t is None:
            del out["type"]
        else:
            out["type"] = t
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: to_json_schema(v) if isinstance(v, dict) else v
                             for k, v in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = to_json_schema(schema[key])
    if isinstance(schema.get("items"), list):
        out["items"] = [to_json_schema(s) for s in schema["items"]]
    return out


def parameters_schema(function: dict) -> dict:
    """The JSON schema of a function's arguments; arguments it does not declare are errors."""
    schema = to_json_schema(function.get("parameters") or {"type": "object"})
    if "properties" in schema:
        schema.setdefault("additionalProperties", False)  # an invented argument is a wrong call
    return schema


def tool_specs(functions: list[dict]) -> list[dict]:
    """Functions in the OpenAI/transformers `tools=` format with standard schemas."""
    return [{"type": "function", "function": {"name": f["name"], "description": f.get("description", ""),
                                              "parameters": to_json_schema(f.get("parameters") or {})}}
            for f in functions]


# -- prompts ----------------------------------------------------------------------------------------
INSTRUCTION = ("You can call the functions below. Answer the user's request with exactly one function call, "
               'written as a single JSON object: {"name": <function name>, "arguments": {<argument>: <value>}}. '
               "Write nothing else.\n\nFunctions:\n")


def _template_text(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None) or ""
    return t if isinstance(t, str) else " ".join(map(str, t.values()))  # a dict of named templates


def prompt_text(tokenizer, question: dict) -> str:
    """The prompt as text: the model's own tool template, or instructions listing the functions."""
    template = _template_text(tokenizer)
    user = {"role": "user", "content": question["question"]}
    if "tools" in template:  # the template renders tool definitions in the format the model was trained on
        return tokenizer.apply_chat_template([user], tools=tool_specs(question["functions"]),
                                             add_generation_prompt=True, tokenize=False)
    system = INSTRUCTION + "\n".join(json.dumps(t) for t in tool_specs(question["functions"]))  # one per line: short
    if template:
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": system}, user],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception:  # some templates reject a system turn: fold it into the user turn
            merged = {"role": "user", "content": f"{system}\n\n{question['question']}"}
            return tokenizer.apply_chat_template([merged], add_generation_prompt=True, tokenize=False)
    return f"{system}\n\nRequest: {question['question']}\nCall:\n"


def build_prompt(tokenizer, question: dict) -> dict:
    """Tokenized prompt ({"input_ids", "attention_mask"}, batch of one) for a question."""
    text = prompt_text(tokenizer, question)
    # A rendered chat template already holds the BOS token; a plain prompt needs the tokenizer's.
    add_special = not _template_text(tokenizer)
    return dict(tokenizer(text, return_tensors="pt", add_special_tokens=add_special))


@torch.no_grad()
def greedy(loaded, inputs: dict, max_new_tokens: int) -> str:
    """Greedy continuation of the prompt, decoded without special tokens.

    No repetition penalty: repeated braces and quotes are normal in JSON.
    """
    tok = loaded.tokenizer
    inputs = {k: v.to(loaded.module.device) for k, v in inputs.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = loaded.module.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# -- extracting and scoring calls -------------------------------------------------------------------
def json_values(text: str):
    """Every JSON object or array in free text, in order of where it starts (nested ones too)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            yield decoder.raw_decode(text, m.start())[0]
        except json.JSONDecodeError:
            continue


def _as_call(obj) -> dict | None:
    """{"name", "arguments"} if obj has the shape of a function call, else None."""
    if isinstance(obj, list):
        return _as_call(obj[0]) if obj else None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        return _as_call(obj["function"])
    # A call names its arguments ("arguments", or "parameters" in Llama 3's format); an echoed function
    # definition also has "parameters" (its schema) but comes with a "description" and no "arguments".
    if "arguments" not in obj and ("parameters" not in obj or "description" in obj):
        return None
    name = obj.get("name")
    args = obj["arguments"] if "arguments" in obj else obj["parameters"]
    if isinstance(args, str):  # OpenAI style: the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def extract_call(text: str) -> dict | None:
    """The first function call ({"name", "arguments"}) written as JSON anywhere in text, or None.

    Accepts ```json fences, <tool_call> tags, "arguments" or "parameters", arguments as a JSON string,
    a list of calls (the first is taken) and any text before or after.
    """
    for value in json_values(text):
        call = _as_call(value)
        if call is not None:
            return call
    return None


def score_call(call: dict | None, functions: list[dict]) -> dict:
    """{"json_valid", "schema_valid", "name", "error"} for an extracted call against the offered functions."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments"), dict):
        return {"json_valid": False, "schema_valid": False, "name": None, "error": "no JSON function call found"}
    name = call["name"]
    function = next((f for f in functions if f.get("name") == name), None)
    if function is None:
        return {"json_valid": True, "schema_valid": False, "name": name, "error": f"unknown function '{name}'"}
    schema = parameters_schema(function)
    validator = schema_validator(schema)  # offline: a $ref is never fetched (network or file)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(call["arguments"]))
    except (referencing.exceptions.Unresolvable, LowbitError, RecursionError) as e:  # remote $ref, slow pattern, loop
        return {"json_valid": True, "schema_valid": False, "name": name,
                "error": f"{name}: the function's schema cannot be checked offline ({type(e).__name__}: {str(e)[:200]})"}
    return {"json_valid": True, "schema_valid": error is None, "name": name,
            "error": "" if error is None else f"{name}: {error.message}"}


def _norm(v):
    """Comparable form of an argument value: numbers as floats, strings trimmed and case-folded."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return " ".join(v.split()).casefold()
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def calls_agree(a: dict | None, b: dict | None) -> bool:
    """Same function and the same arguments after normalising; two missing calls agree (same behaviour)."""
    if a is None or b is None:
        return a is None and b is None
    return a.get("name") == b.get("name") and _norm(a.get("arguments")) == _norm(b.get("arguments"))


# BFCL's own string normalisation: ignore spaces, ",./-_*^", case, and quote style.
def _bfcl_str(s: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _value_ok(value, accepted: list) -> bool:
    return any(_same(value, option) for option in accepted if option != "")


def _same(value, option) -> bool:
    if isinstance(option, dict) and isinstance(value, dict):  # nested: option maps key -> accepted values
        return (all(k in option and _value_ok(v, option[k]) for k, v in value.items())
                and all(k in value or "" in acc for k, acc in option.items()))
    if isinstance(option, str) and isinstance(value, str):
        return _bfcl_str(value) == _bfcl_str(option)
    if isinstance(option, list) and isinstance(value, list):
        return len(option) == len(value) and all(_same(v, o) for v, o in zip(value, option))
    if isinstance(option, bool) or isinstance(value, bool):
        return value is option
    if isinstance(option, (int, float)) and isinstance(value, (int, float)):
        return float(value) == float(option)
    return value == option


def matches_answer(call: dict | None, answer: list[dict] | None) -> bool:
    """Does the call match BFCL's possible answer? ("" among accepted values: the argument may be left out)."""
    if call is None or not answer:
        return False
    expected = answer[0]  # single-call categories: one expected call, {name: {argument: [accepted]}}
    if call["name"] not in expected:
        return False
    accepted, args = expected[call["name"]], call["arguments"]
    return (all(k in accepted and _value_ok(v, accepted[k]) for k, v in args.items())
            and all(k in args or "" in acc for k, acc in accepted.items()))


# -- the suite --------------------------------------------------------------------------------------
def _short(text: str, n: int = SHOW_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _pct(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def _answer(loaded, questions: list[dict], generate_fn: GenerateFn | None, max_new_tokens: int) -> list[dict]:
    prompts = [build_prompt(loaded.tokenizer, q) for q in questions]
    if generate_fn is None:  # the real models: batched greedy decoding
        texts = greedy_batch(loaded.module, loaded.tokenizer, [p["input_ids"][0] for p in prompts], max_new_tokens)
    else:
        texts = [generate_fn(loaded, p, max_new_tokens) for p in prompts]
    rows = []
    for q, text in zip(questions, texts):
        call = extract_call(text)
        rows.append({"text": text, "call": call, **score_call(call, q["functions"]),
                     "gt": matches_answer(call, q.get("answer"))})
    return rows


def _worst(questions, base_rows, cand_rows) -> list[Case]:
    cases = []
    for q, b, c in zip(questions, base_rows, cand_rows):
        agree = calls_agree(b["call"], c["call"])
        if c["schema_valid"] and agree:
            continue
        # cases the baseline got right (the quantization broke them) first; then invalid JSON, then a
        # schema error, then a valid call that differs from the baseline's
        score = (3.0 if not c["json_valid"] else 2.0 if not c["schema_valid"] else 1.0) + 3.0 * b["schema_valid"]
        cases.append(Case(id=q["id"], text=_short(q["question"]), baseline=_short(b["text"]),
                          candidate=_short(c["text"]), score=score))
    return sorted(cases, key=lambda c: -c.score)[:MAX_WORST]


def run(baseline, candidate, n: int = 12, max_new_tokens: int = 64, quick: bool = False,
        generate_fn: GenerateFn | None = None, questions: list[dict] | None = None, seed: int = 0) -> SuiteResult:
    """Tool-calling suite: both models (lowbit.Model handles) answer the same BFCL questions greedily.

    generate_fn(loaded, inputs, max_new_tokens) -> text replaces the model call (tests); questions
    replaces the BFCL sample.
    """
    if questions is None:
        questions = load_questions(2 if quick else n, seed)
    if quick:
        max_new_tokens = min(max_new_tokens, 40)
    if generate_fn is None:  # the real model's answers: the baseline's are cached between runs
        from lowbit.eval.basecache import cached

        base = cached("tool_calling", baseline, {"questions": [q["id"] for q in questions], "max_new": max_new_tokens},
                      lambda: _answer(baseline, questions, None, max_new_tokens))
    else:
        base = _answer(baseline, questions, generate_fn, max_new_tokens)
    need = max(1, math.ceil(MIN_BASELINE_VALID * len(questions)))
    n_valid = sum(bool(r["schema_valid"]) for r in base)
    cats = sorted({q.get("category", "custom") for q in questions})
    if n_valid < need:  # a drop cannot be seen from here: the candidate is not asked
        pct = _pct([r["schema_valid"] for r in base])
        why = (f"the baseline wrote {n_valid} schema-valid call(s) of {len(questions)} ({pct:.0f}%), under the "
               f"{need} needed to see a drop; the structured suite scores JSON structure on any model")
        return SuiteResult(name="tool_calling", metric="json_valid_pct", baseline=_pct([r["json_valid"] for r in base]),
                           candidate=float("nan"), higher_is_better=True, n=len(questions),
                           metrics={"json_valid_pct": {"baseline": _pct([r["json_valid"] for r in base]),
                                                       "candidate": None}},
                           notes=f"BFCL v4 ({', '.join(cats)}); not applicable: {why}", skipped=why)
    cand = _answer(candidate, questions, generate_fn, max_new_tokens)

    def both(key: str) -> dict[str, float]:
        return {"baseline": _pct([r[key] for r in base]), "candidate": _pct([r[key] for r in cand])}

    metrics = {"json_valid_pct": both("json_valid"), "schema_valid_pct": both("schema_valid"),
               "agreement_with_baseline_pct": {"baseline": 100.0, "candidate": _pct(
                   [calls_agree(b["call"], c["call"]) for b, c in zip(base, cand)])}}
    with_answer = [i for i, q in enumerate(questions) if q.get("answer")]
    if with_answer:
        metrics["ground_truth_match_pct"] = {"baseline": _pct([base[i]["gt"] for i in with_answer]),
                                             "candidate": _pct([cand[i]["gt"] for i in with_answer])}
    return SuiteResult(
        name="tool_calling", metric="json_valid_pct", baseline=metrics["json_valid_pct"]["baseline"],
        candidate=metrics["json_valid_pct"]["candidate"], higher_is_better=True, n=len(questions),
        metrics=metrics, worst=_worst(questions, base, cand),
        notes=f"BFCL v4 ({', '.join(cats)}), {len(questions)} questions, greedy, max_new_tokens={max_new_tokens}; "
              f"ground truth for {len(with_answer)}")
