import json
from types import SimpleNamespace

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.suites import user
from tests.conftest import make_tokenizer

GOOD = ['{"prompt": "What is 2+2?", "expected": "4"}', '{"prompt": "Say hi."}']


def write(tmp_path, lines, name="evals.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- loading ----------------------------------------------------------------------------------------
def test_load_items_fills_defaults(tmp_path):
    path = write(tmp_path, [GOOD[0], "", '  ', GOOD[1],
                            '{"id": "r", "prompt": "Colour?", "expected": "x", "max_new_tokens": 8, '
                            '"check": {"type": "regex", "value": "(?i)red"}}'])
    a, b, c = user.load_items(path)
    assert a == {"id": "line1", "prompt": "What is 2+2?", "check": {"type": "exact", "value": "4"},
                 "max_new_tokens": 128, "line": 1}
    assert (b["id"], b["check"], b["line"]) == ("line4", None, 4)  # blank lines are skipped but counted
    assert (c["id"], c["check"], c["max_new_tokens"]) == ("r", {"type": "regex", "value": "(?i)red"}, 8)


@pytest.mark.parametrize("bad, fragment", [
    ('{"prompt": "x"', "not valid JSON"),
    ('["prompt"]', "must be a JSON object"),
    ('{"expected": "4"}', "field 'prompt' is missing or empty"),
    ('{"prompt": "   "}', "field 'prompt' is missing or empty"),
    ('{"prompt": 3}', "field 'prompt'"),
    ('{"prompt": "x", "expect": "4"}', "unknown field 'expect'"),
    ('{"prompt": "x", "expected": 4}', "field 'expected' must be a string"),
    ('{"prompt": "x", "id": 7}', "field 'id'"),
    ('{"prompt": "x", "max_new_tokens": 0}', "field 'max_new_tokens'"),
    ('{"prompt": "x", "max_new_tokens": "64"}', "field 'max_new_tokens'"),
    ('{"prompt": "x", "check": "regex"}', "field 'check' must be an object"),
    ('{"prompt": "x", "check": {"type": "fuzzy", "value": "a"}}', "field 'check.type' is 'fuzzy'; fix: use one of"),
    ('{"prompt": "x", "check": {"value": "a"}}', "field 'check.type' is None"),
    ('{"prompt": "x", "check": {"type": "regex", "value": "(unclosed"}}', "not a valid regular expression"),
    ('{"prompt": "x", "check": {"type": "contains", "value": ["a"]}}', "must be a string"),
    ('{"prompt": "x", "check": {"type": "json_schema", "value": {"type": "strnig"}}}', "not a valid JSON schema"),
    ('{"prompt": "x", "check": {"type": "json_schema", "value": "object"}}', "must be a JSON schema object"),
    ('{"id": "line1", "prompt": "again"}', "field 'id' 'line1' repeats line 1"),
])
def test_bad_line_names_file_line_and_field(tmp_path, bad, fragment):
    path = write(tmp_path, GOOD + [bad])
    with pytest.raises(LowbitError) as e:
        user.load_items(path)
    msg = str(e.value)
    assert f"eval file {path}: line 3" in msg and fragment in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_has_no_prompts(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(LowbitError, match=r"empty\.jsonl: no prompts; fix: add lines"):
        user.load_items(path)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        user.load_items(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(LowbitError, match="UTF-8"):
        user.load_items(tmp_path / "latin1.jsonl")


# -- checks -----------------------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("check, output, passes", [
    ({"type": "exact", "value": "4"}, "  4\n", True),
    ({"type": "exact", "value": "4"}, "4.", False),
    ({"type": "exact", "value": "4"}, "The answer is 4", False),
    ({"type": "contains", "value": "Paris"}, "It is Paris, of course.", True),
    ({"type": "contains", "value": "Paris"}, "it is paris", False),
    ({"type": "regex", "value": r"(?i)\bred\b"}, "Red, I think.", True),
    ({"type": "regex", "value": r"^\d+$"}, "42 apples", False),
    ({"type": "json_schema", "value": PERSON}, '{"name": "Ada", "age": 36}', True),
    ({"type": "json_schema", "value": PERSON}, 'Here:\n```json\n{"name": "Ada", "age": 36}\n```', True),
    ({"type": "json_schema", "value": PERSON}, '{"name": "Ada", "age": "36"}', False),
    ({"type": "json_schema", "value": PERSON}, '{"name": "Ada"}', False),
    ({"type": "json_schema", "value": PERSON}, "Ada is 36.", False),
    ({"type": "json_schema", "value": {"type": "integer"}}, " 7 ", True),
    ({"type": "json_schema", "value": {"type": "null"}}, "null", True),
])
def test_checks(check, output, passes):
    assert user.check_output(check, output) is passes


# -- the suite --------------------------------------------------------------------------------------
ITEMS = [
    {"id": "add", "prompt": "What is 2+2?", "expected": "4"},  # both pass
    {"id": "cap", "prompt": "Capital of France?", "check": {"type": "contains", "value": "Paris"}},  # regression
    {"id": "json", "prompt": "Ada as JSON.", "check": {"type": "json_schema", "value": PERSON}},  # both fail
    {"id": "col", "prompt": "A primary colour?", "check": {"type": "regex", "value": "(?i)red|blue"}},  # fixed
    {"id": "same", "prompt": "Say hello."},  # agreement: outputs equal
    {"id": "diff", "prompt": "Write a haiku.", "max_new_tokens": 5},  # agreement: outputs differ
]
OUTPUTS = {
    "base": {"add": "4", "cap": "Paris.", "json": "Ada, 36", "col": "green", "same": "Hello!", "diff": "Old pond"},
    "cand": {"add": " 4 ", "cap": "Lyon.", "json": '{"name": "Ada"}', "col": "Blue", "same": "Hello! ",
             "diff": "A frog"},
}


def fake_generate(calls):
    def generate(loaded, inputs, max_new_tokens):
        prompt = loaded.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
        (item,) = [it for it in ITEMS if it["prompt"] == prompt]
        calls.append((loaded.name, item["id"], max_new_tokens))
        return OUTPUTS[loaded.name][item["id"]]
    return generate


def models():
    tok = make_tokenizer()
    return SimpleNamespace(name="base", tokenizer=tok), SimpleNamespace(name="cand", tokenizer=tok)


def test_run_gives_exact_pass_rates(tmp_path):
    path = write(tmp_path, [json.dumps(it) for it in ITEMS], name="support.jsonl")
    calls = []
    r = user.run(*models(), path, generate_fn=fake_generate(calls))
    assert (r.name, r.metric, r.n, r.higher_is_better) == ("user:support.jsonl", "pass_pct", 6, True)
    # baseline: add, cap, same, diff pass (agreement items always pass for it); candidate: add, col, same
    assert (r.baseline, r.candidate) == pytest.approx((400 / 6, 300 / 6))
    assert r.metrics["agreement_with_baseline_pct"] == {"baseline": 100.0, "candidate": pytest.approx(200 / 6)}  # add, same
    # regressions (the baseline passed) first, then failures both share
    assert [(c.id, c.score) for c in r.worst] == [("cap", 2.0), ("diff", 2.0), ("json", 1.0)]
    assert (r.worst[0].text, r.worst[0].baseline, r.worst[0].candidate) == ("Capital of France?", "Paris.", "Lyon.")
    assert ("cand", "diff", 5) in calls and ("base", "add", 128) in calls and len(calls) == 12


def test_quick_runs_first_five_items(tmp_path):
    path = write(tmp_path, [json.dumps(it) for it in ITEMS])
    calls = []
    r = user.run(*models(), path, quick=True, generate_fn=fake_generate(calls))
    assert r.n == 5 and {c[1] for c in calls} == {it["id"] for it in ITEMS[:5]}


def test_run_on_tiny_model(tiny_dir, tmp_path):
    from lowbit.model.load import load_model

    tiny = load_model(tiny_dir)
    path = write(tmp_path, ['{"prompt": "Hello", "max_new_tokens": 4}',
                            '{"prompt": "Hi", "check": {"type": "regex", "value": "."}, "max_new_tokens": 4}'])
    r = user.run(tiny, tiny, path)
    assert r.baseline == r.candidate and r.metrics["agreement_with_baseline_pct"]["candidate"] == 100.0
    assert r.n == 2 and r.metrics["pass_pct"]["baseline"] >= 50.0  # the agreement item passes for both


def test_docstring_examples_load(tmp_path):
    examples = [ln.strip() for ln in user.__doc__.splitlines() if ln.strip().startswith('{"prompt"')]
    items = user.load_items(write(tmp_path, examples))
    assert [it["check"]["type"] if it["check"] else None for it in items] == ["exact", "regex", "json_schema", None]
