import importlib.util
import json
from types import SimpleNamespace

import jsonschema
import pytest

from lowbit.errors import LowbitError
from lowbit.eval.suites import tool_calling as tc
from lowbit.eval.types import SuiteResult
from tests.conftest import make_tokenizer

HAVE_BFCL = importlib.util.find_spec("bfcl_eval") is not None
needs_bfcl = pytest.mark.skipif(not HAVE_BFCL, reason="bfcl-eval is not installed; fix: "
                                "pip install --no-deps bfcl-eval==2026.3.23")

# BFCL-style definitions: Python type names ("dict", "float") as the real data uses them.
WEATHER = {"name": "get_weather", "description": "Current weather of a city.",
           "parameters": {"type": "dict", "properties": {
               "city": {"type": "string", "description": "City name."},
               "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit."}},
               "required": ["city"]}}
ADD = {"name": "add", "description": "Add two integers.",
       "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"]}}
AREA = {"name": "area", "description": "Area of a circle.",
        "parameters": {"type": "dict", "properties": {"r": {"type": "float"}, "data": {"type": "any"},
                                                      "at": {"type": "tuple", "items": {"type": "float"}}},
                       "required": ["r"]}}


def score(text: str, functions=(WEATHER,)) -> dict:
    return tc.score_call(tc.extract_call(text), list(functions))


# -- scoring ----------------------------------------------------------------------------------------
def test_valid_call():
    s = score('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}')
    assert s == {"json_valid": True, "schema_valid": True, "name": "get_weather", "error": ""}


def test_invalid_json_is_neither_valid():
    s = score('{"name": "get_weather", "arguments": {"city": "Paris"')
    assert not s["json_valid"] and not s["schema_valid"] and s["name"] is None


def test_unknown_function():
    s = score('{"name": "get_forecast", "arguments": {"city": "Paris"}}')
    assert s["json_valid"] and not s["schema_valid"] and "unknown function" in s["error"]


def test_missing_required_argument():
    s = score('{"name": "add", "arguments": {"a": 1}}', [ADD])
    assert s["json_valid"] and not s["schema_valid"] and "'b' is a required property" in s["error"]


@pytest.mark.parametrize("args", ['{"a": "1", "b": 2}', '{"a": 1.5, "b": 2}', '{"a": true, "b": 2}'])
def test_wrong_type(args):
    s = score(f'{{"name": "add", "arguments": {args}}}', [ADD])
    assert s["json_valid"] and not s["schema_valid"]


def test_enum_and_invented_argument_are_schema_errors():
    assert not score('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}')["schema_valid"]
    assert not score('{"name": "get_weather", "arguments": {"city": "Paris", "lang": "fr"}}')["schema_valid"]


def test_fenced_json_is_valid():
    s = score('Sure!\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```\nDone.')
    assert s["json_valid"] and s["schema_valid"]


def test_bfcl_type_names_map_to_json_schema():
    ok = '{"name": "area", "arguments": {"r": 2, "data": [1, "x"], "at": [1.0, 2.5]}}'  # int is a valid float
    assert score(ok, [AREA])["schema_valid"]
    assert not score('{"name": "area", "arguments": {"r": 2, "at": "here"}}', [AREA])["schema_valid"]
    assert tc.to_json_schema(AREA["parameters"])["properties"]["data"] == {}  # "any": no constraint


# -- extraction -------------------------------------------------------------------------------------
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3 style
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments as a JSON string
    'I will call it: {"name": "get_weather", "arguments": {"city": "Paris"}} }}} trailing junk {',
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "x", "arguments": {}}]',
    '{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',  # nested in a wrapper
    '{"note": 1} then {"name": "get_weather", "arguments": {"city": "Paris"}}',  # first JSON is not a call
])
def test_extract_call_variants(text):
    assert tc.extract_call(text) == CALL


ECHOED_DEFINITION = json.dumps(tc.tool_specs([WEATHER])[0])  # small models often repeat the tool list


def test_zero_argument_call():
    assert tc.extract_call('{"name": "now", "arguments": {}}') == {"name": "now", "arguments": {}}


@pytest.mark.parametrize("text", ["", "no json here", '{"city": "Paris"}', '{"name": "f", "arguments": [1]}',
                                  '{"name": "get_weather"}', '{"name": "get_weather", "description": "x"}',
                                  ECHOED_DEFINITION,
                                  "{'name': 'get_weather', 'arguments': {}}", '{"name": "get_weather", "argu'])
def test_extract_call_none(text):
    assert tc.extract_call(text) is None


def test_calls_agree_after_normalising():
    a = {"name": "f", "arguments": {"x": 5, "s": "New  York", "l": [1, 2]}}
    assert tc.calls_agree(a, {"name": "f", "arguments": {"l": [1.0, 2], "s": " new york", "x": 5.0}})
    assert not tc.calls_agree(a, {"name": "g", "arguments": a["arguments"]})
    assert not tc.calls_agree(a, {"name": "f", "arguments": {"x": 6, "s": "New York", "l": [1, 2]}})
    assert tc.calls_agree(None, None) and not tc.calls_agree(a, None)


def test_matches_bfcl_answer():
    answer = [{"get_weather": {"city": ["Paris", "Paris, France"], "unit": ["", "c"]}}]
    assert tc.matches_answer({"name": "get_weather", "arguments": {"city": "paris,france"}}, answer)
    assert tc.matches_answer({"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, answer)
    assert not tc.matches_answer({"name": "get_weather", "arguments": {"city": "Lyon"}}, answer)
    assert not tc.matches_answer({"name": "get_weather", "arguments": {"unit": "c"}}, answer)  # city required
    assert not tc.matches_answer({"name": "get_weather", "arguments": {"city": "Paris", "x": 1}}, answer)


# -- real BFCL data ---------------------------------------------------------------------------------
@needs_bfcl
def test_load_real_questions():
    qs = tc.load_questions(8, seed=1)
    assert len(qs) == 8 and qs == tc.load_questions(8, seed=1)
    assert len({q["id"] for q in qs}) == 8
    for q in qs:
        assert q["category"] in tc.CATEGORIES and q["question"].strip()
        assert q["functions"] and all("name" in f and "parameters" in f for f in q["functions"])
        assert q["answer"] and list(q["answer"][0])[0] in {f["name"] for f in q["functions"]}


@needs_bfcl
def test_every_bfcl_schema_converts_to_valid_json_schema():
    # Draft 7's meta-schema: same keywords here, three times faster to check than 2020-12's
    meta = jsonschema.Draft7Validator(jsonschema.Draft7Validator.META_SCHEMA)
    bad = [q["id"] for q in tc.load_questions(10**6) for f in q["functions"]
           if not meta.is_valid(tc.parameters_schema(f))]
    assert bad == []


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr("lowbit.data.corpora.importlib.util.find_spec", lambda name: None)
    with pytest.raises(LowbitError, match=r"pip install --no-deps bfcl-eval==2026\.3\.23"):
        tc.load_questions(3)


def test_damaged_file_names_path_and_line(monkeypatch, tmp_path):
    bad = tmp_path / "BFCL_v4_simple_python.json"
    bad.write_text('{"id": "a", "question": [[]], "function": []}\n{broken\n')
    monkeypatch.setattr(tc, "package_file", lambda package, rel, hint: bad)
    with pytest.raises(LowbitError, match=rf"{bad}: line 2 .*bfcl-eval==2026\.3\.23"):
        tc.load_questions(3)


# -- prompts ----------------------------------------------------------------------------------------
QUESTION = {"id": "q", "question": "Weather in Paris?", "functions": [WEATHER]}


def test_plain_prompt_without_chat_template():
    text = tc.prompt_text(make_tokenizer(), QUESTION)
    assert "Weather in Paris?" in text and '"name": "get_weather"' in text and '"type": "object"' in text


def test_prompt_uses_chat_template_and_its_tools():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    text = tc.prompt_text(tok, QUESTION)
    assert text.startswith("<system>You can call") and "get_weather" in text and text.endswith("<assistant>")
    tok.chat_template = ("{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    assert tc.prompt_text(tok, QUESTION) == "[tool get_weather]<user>Weather in Paris?<assistant>"


def test_template_without_system_role_gets_instructions_in_user_turn():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    text = tc.prompt_text(tok, QUESTION)
    assert text.startswith("<user>You can call") and text.endswith("Weather in Paris?")


# -- the suite --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from lowbit.model.load import load_model

    return load_model(tiny_dir)


def test_run_on_tiny_model(tiny):
    questions = tc.load_questions(2) if HAVE_BFCL else [QUESTION, {**QUESTION, "id": "q2"}]
    r = tc.run(tiny, tiny, questions=questions, max_new_tokens=8)
    assert isinstance(r, SuiteResult) and r.name == "tool_calling" and r.metric == "json_valid_pct"
    assert r.n == 2 and r.higher_is_better
    # a random tiny model writes no valid call: a drop cannot be seen, so the candidate is not asked and
    # the suite says why (its gate criteria read "not applicable", neither pass nor fail)
    assert r.skipped and "schema-valid call(s) of 2" in r.skipped and r.metrics["json_valid_pct"]["candidate"] is None
    back = SuiteResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.skipped == r.skipped and back.n == r.n


def test_a_suite_that_cannot_judge_reads_not_applicable_in_the_gate():
    from lowbit.eval.gate import evaluate, parse_spec

    spec = parse_spec({"quality": {"max_mean_kld": 0.1, "suites": {"json": {"max_valid_drop": 10}}}}, "t")
    skipped = {"name": "tool_calling", "skipped": "the baseline wrote 0 schema-valid call(s)", "metrics": {}}
    run = {"divergence": {"mean_kld": 0.01}, "suites": [skipped]}
    g = evaluate(spec, run)
    row = next(r for r in g["criteria"] if r["name"].startswith("json"))
    assert row["passed"] is None and "not applicable: the baseline wrote 0" in row["detail"]
    assert g["passed"]  # the judged rows decide
    run["divergence"]["mean_kld"] = 0.5
    assert not evaluate(spec, run)["passed"]
    only = parse_spec({"quality": {"suites": {"json": {"max_valid_drop": 10}}}}, "t")
    assert not evaluate(only, {"suites": [skipped]})["passed"]  # nothing judged: no pass


QUESTIONS = [
    {"id": "w", "question": "Weather in Paris?", "functions": [WEATHER],
     "answer": [{"get_weather": {"city": ["Paris"], "unit": ["", "c", "f"]}}]},
    {"id": "s", "question": "What is 2 plus 3?", "functions": [ADD], "answer": [{"add": {"a": [2], "b": [3]}}]},
    {"id": "c", "question": "Area of a circle of radius 1.5?", "functions": [WEATHER, AREA],
     "answer": [{"area": {"r": [1.5], "data": [""], "at": [""]}}]},
    {"id": "x", "question": "Tell me a joke.", "functions": [ADD], "answer": [{"add": {"a": [0], "b": [0]}}]},
]
OUTPUTS = {
    "base": {"w": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
             "s": '```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n```',
             "c": '<tool_call>{"name": "area", "parameters": {"r": 1.5}}</tool_call>',
             "x": "Why did the chicken cross the road?"},
    "cand": {"w": '{"name": "get_weather", "arguments": {"city": "paris "}}',  # agrees; matches the answer
             "s": '{"name": "add", "arguments": {"a": "2", "b": 3}}',  # wrong type
             "c": '{"name": "volume", "arguments": {"r": 1.5}}',  # unknown function
             "x": "Why did the chicken cross the road?"},  # no call, like the baseline: agrees
}


def fake_generate(loaded, inputs, max_new_tokens):
    prompt = loaded.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    (qid,) = [q["id"] for q in QUESTIONS if q["question"] in prompt]
    return OUTPUTS[loaded.name][qid]


def test_run_scores_injected_outputs_exactly():
    tok = make_tokenizer()
    base, cand = SimpleNamespace(name="base", tokenizer=tok), SimpleNamespace(name="cand", tokenizer=tok)
    r = tc.run(base, cand, questions=QUESTIONS, generate_fn=fake_generate)
    assert r.metrics == {
        "json_valid_pct": {"baseline": 75.0, "candidate": 75.0},
        "schema_valid_pct": {"baseline": 75.0, "candidate": 25.0},
        "agreement_with_baseline_pct": {"baseline": 100.0, "candidate": 50.0},
        "ground_truth_match_pct": {"baseline": 75.0, "candidate": 25.0},
    }
    assert (r.baseline, r.candidate, r.n) == (75.0, 75.0, 4)
    # calls the baseline made correctly and the candidate broke rank above the joke both failed
    assert [(c.id, c.score) for c in r.worst] == [("s", 5.0), ("c", 5.0), ("x", 3.0)]
    assert r.worst[0].text == "What is 2 plus 3?" and '"a": "2"' in r.worst[0].candidate


def test_quick_uses_two_questions_and_short_answers(monkeypatch):
    seen, budgets = [], []
    monkeypatch.setattr(tc, "load_questions", lambda n, seed=0: seen.append(n) or QUESTIONS[:1])
    tok = make_tokenizer()
    tc.run(SimpleNamespace(tokenizer=tok), SimpleNamespace(tokenizer=tok), n=50, quick=True,
           generate_fn=lambda loaded, inputs, max_new_tokens: budgets.append(max_new_tokens)
           or OUTPUTS["base"]["w"])
    assert seen == [2] and budgets == [40, 40]
