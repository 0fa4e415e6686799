"""Free-generation JSON tasks a small model can do: short formatting requests built from real text.

Each task names the keys and gives the values (an article's title and its word count, or its first
year and first capitalised word), asks for one JSON object and nothing else, and is checked three
ways on the first JSON value in the output (code fences and surrounding text allowed): it parses
(`valid_pct`), it has the required keys with the right JSON types (`schema_valid_pct`), and its values
equal the given ones (`correct_pct`). Both models decode greedily, batched, from the model's chat
template (a plain prompt when there is none). BFCL's tool calls (the `json` suite) stay for models
that can call tools; these tasks are within reach of the bundled SmolLM2, so a drop means something.
"""

from __future__ import annotations

import random
import re

import jsonschema

from lowbit.data.corpora import wikipedia_articles
from lowbit.eval.suites.tool_calling import json_values
from lowbit.eval.types import Case, SuiteResult
from lowbit.runtime.generate import encode_prompt

MAX_NEW_TOKENS = 40


def tasks(n: int, seed: int = 0) -> list[dict]:
    """n tasks from Wikipedia articles: {id, prompt, schema, expected}."""
    arts = wikipedia_articles()
    rng = random.Random(seed)
    out = []
    for title, body in rng.sample(arts, min(len(arts), n)):
        words = len(body.split())
        year = next((int(y) for y in re.findall(r"\b(1[0-9]{3}|20[0-2][0-9])\b", body)), None)
        if year is not None and len(out) % 2:
            prompt = (f'Write a JSON object with keys "title" and "year" for the article "{title}", whose first '
                      f"year mentioned is {year}. Output only JSON.")
            expected = {"title": title, "year": year}
        else:
            prompt = (f'Write a JSON object with keys "title" and "word_count" for the article "{title}", which '
                      f"has {words} words. Output only JSON.")
            expected = {"title": title, "word_count": words}
        schema = {"type": "object", "required": list(expected),
                  "properties": {k: {"type": "string" if isinstance(v, str) else "integer"} for k, v in expected.items()}}
        out.append({"id": f"wiki:{title[:40]}", "prompt": prompt, "schema": schema, "expected": expected})
    return out


def score(text: str, task: dict) -> dict:
    value = next(iter(json_values(text)), None)
    valid = value is not None
    schema_ok = valid and jsonschema.Draft202012Validator(task["schema"]).is_valid(value)
    correct = schema_ok and all(value.get(k) == v for k, v in task["expected"].items())
    return {"valid": valid, "schema_valid": bool(schema_ok), "correct": bool(correct)}


def _encode(tokenizer, prompt: str):
    """The prompt's ids (1-D) in the model's chat format, or plain when it has none."""
    return encode_prompt(tokenizer, prompt, chat=True)["input_ids"][0]


def run(baseline, candidate, quick: bool = False, n: int | None = None) -> SuiteResult:
    from lowbit.runtime.generate import greedy_batch

    todo = tasks(n or (4 if quick else 8))
    tok = baseline.tokenizer
    prompts = [_encode(tok, t["prompt"]) for t in todo]
    scored = {}
    outputs = {}
    from lowbit.eval.basecache import cached

    for who, m in (("baseline", baseline), ("candidate", candidate)):
        gen = lambda m=m: greedy_batch(m.module, tok, prompts, MAX_NEW_TOKENS)  # noqa: E731
        outputs[who] = (cached("json_tasks", m, {"prompts": [p.tolist() for p in prompts], "max_new": MAX_NEW_TOKENS},
                               gen) if who == "baseline" else gen())
        scored[who] = [score(o, t) for o, t in zip(outputs[who], todo)]

    def pct(who: str, key: str) -> float:
        return 100 * sum(s[key] for s in scored[who]) / max(len(todo), 1)

    metrics = {f"{k}_pct": {"baseline": pct("baseline", k), "candidate": pct("candidate", k)}
               for k in ("valid", "schema_valid", "correct")}
    worst = [Case(t["id"], t["prompt"], outputs["baseline"][i][:160], outputs["candidate"][i][:160],
                  float(scored["baseline"][i]["correct"]) - float(scored["candidate"][i]["correct"])
                  + float(scored["baseline"][i]["valid"]) - float(scored["candidate"][i]["valid"]))
             for i, t in enumerate(todo)]
    worst = sorted(worst, key=lambda c: c.score, reverse=True)[:5]
    templated = bool(getattr(tok, "chat_template", None))
    return SuiteResult(
        name="json_tasks", metric="valid_pct", baseline=metrics["valid_pct"]["baseline"],
        candidate=metrics["valid_pct"]["candidate"], higher_is_better=True, n=len(todo), metrics=metrics,
        worst=worst,
        notes=(f"{len(todo)} formatting tasks from Wikipedia articles, greedy, up to {MAX_NEW_TOKENS} new tokens; "
               + ("chat template" if templated else "the tokenizer has no chat template: plain prompts")))
