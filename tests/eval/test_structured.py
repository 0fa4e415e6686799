"""The structured-output suite: character classes of a JSON answer, and teacher-forced divergence that
sees damage to the structure tokens which the value tokens and Wikipedia text do not show."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.eval.gate import evaluate as gate_eval
from lowbit.eval.gate import parse_spec
from lowbit.eval.suites import structured
from tests.conftest import make_tiny_llama, make_tokenizer


def test_char_classes_split_structure_keys_and_values():
    text = '{"name": "a,b", "n": [1, 2]}'
    cls = "".join(structured.char_classes(text))
    assert cls[0] == "s" and cls[1] == "s" and cls[2:6] == "kkkk" and cls[6] == "s"  # {"name"
    assert text[cls.index("v")] == "a" and cls[text.index("a,b") + 1] == "v"  # a comma inside a string is a value
    assert cls[text.index("[")] == "s" and cls[text.index("1")] == "v" and cls[text.index("]")] == "s"


def test_escaped_quotes_stay_inside_their_string():
    text = '{"k\\"ey": "v\\"al"}'
    cls = structured.char_classes(text)
    assert [c for ch, c in zip(text, cls) if ch == ":"] == ["s"]
    assert cls[text.index("e")] == "k" and cls[text.index("a")] == "v"


def _handle(model):
    return lowbit.Model(model, make_tokenizer())


@pytest.fixture
def base(monkeypatch):
    monkeypatch.setattr(structured, "MAX_SAMPLE_TOKENS", 2048)  # the test tokenizer spends a token per byte
    return _handle(make_tiny_llama(max_position_embeddings=2048))


def damage_structure_rows(module, tok, factor: float) -> int:
    """Scale the output-head rows of tokens made only of JSON punctuation (the head is untied first);
    benchmarks/structured.py plants the same damage."""
    rows = [i for t, i in tok.get_vocab().items()
            if (text := tok.convert_tokens_to_string([t]).strip()) and set(text) <= set('{}[]:,"')]
    with torch.no_grad():
        module.lm_head.weight = torch.nn.Parameter(module.lm_head.weight.detach().clone(), requires_grad=False)
        module.lm_head.weight[rows] *= factor
    return len(rows)


SPEC = {"quality": {"suites": {"structured": {"max_kld": 0.05, "max_top1_loss_pct": 3}}}}


def test_same_model_scores_zero_and_damage_is_measured_and_gated(base):
    same = structured.run(base, _handle(make_tiny_llama(max_position_embeddings=2048)), quick=True)
    assert same.n >= 3 and same.candidate == pytest.approx(0.0, abs=1e-6)
    assert same.metrics["struct_top1_loss_pct"]["candidate"] == 0
    damaged = make_tiny_llama(max_position_embeddings=2048)
    damage_structure_rows(damaged, make_tokenizer(), -20.0)
    res = structured.run(base, _handle(damaged), quick=True)
    assert res.metrics["struct_kld"]["candidate"] > 0.05
    assert res.metrics["struct_nll"]["candidate"] > res.metrics["struct_nll"]["baseline"]
    spec = parse_spec(SPEC, "test")
    assert gate_eval(spec, {"suites": [same.to_dict()], "baseline": {}, "candidate": {}})["passed"]
    verdict = gate_eval(spec, {"suites": [res.to_dict()], "baseline": {}, "candidate": {}})
    assert not verdict["passed"] and verdict["criteria"][0]["name"].startswith("structured: KLD")


@pytest.mark.slow
def test_on_the_bundled_model_structure_damage_shows_on_structure_tokens_and_int8_passes():
    """SmolLM2 writes no valid tool call greedily, yet it predicts the structure of a given JSON answer:
    scaling the structural tokens' head rows by 0.7 moves KLD on structure tokens far more than on
    values, and fails the criteria an honest INT8 candidate passes."""
    base = lowbit.load("smollm2-135m")
    damaged = lowbit.load("smollm2-135m")
    damage_structure_rows(damaged.module, damaged.tokenizer, 0.7)
    res = structured.run(base, damaged, quick=True)
    m = res.metrics
    assert m["struct_kld"]["candidate"] > 5 * m["value_kld"]["candidate"]
    assert m["struct_top1_loss_pct"]["candidate"] > 10
    honest = structured.run(base, lowbit.quantize(lowbit.load("smollm2-135m"), "int8"), quick=True)
    spec = parse_spec(SPEC, "test")
    assert gate_eval(spec, {"suites": [honest.to_dict()], "baseline": {}, "candidate": {}})["passed"]
    assert not gate_eval(spec, {"suites": [res.to_dict()], "baseline": {}, "candidate": {}})["passed"]


def test_a_model_too_short_for_every_sample_is_reported_not_measured_and_gates_fail():
    short = _handle(make_tiny_llama(max_position_embeddings=64))
    res = structured.run(short, short, quick=True)
    assert res.n == 0 and res.metrics == {} and "not measured" in res.notes
    verdict = gate_eval(parse_spec(SPEC, "test"), {"suites": [res.to_dict()], "baseline": {}, "candidate": {}})
    assert not verdict["passed"] and verdict["criteria"][0]["value"] is None


def _jsonl(path, rows):
    import json

    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_a_users_own_samples_replace_the_built_in_ones(base, tmp_path):
    f = _jsonl(tmp_path / "s.jsonl", [{"prompt": "City of the Louvre as JSON", "answer": {"city": "Paris"}},
                                      {"id": "two", "prompt": "Two numbers", "answer": "[1, 2]"}])
    samples = structured.load_samples(f)
    assert [s["answer"] for s in samples] == ['{"city": "Paris"}', "[1, 2]"] and samples[1]["id"] == "two"
    res = structured.run(base, base, file=f)
    assert res.n == 2 and res.candidate == pytest.approx(0.0, abs=1e-6) and "file" in res.notes


@pytest.mark.parametrize("rows, match", [
    ([{"answer": {"a": 1}}], "line 1.*'prompt'"),
    ([{"prompt": "x", "answer": {"a": 1}}, {"prompt": "y"}], "line 2.*'answer' is missing"),
    ([{"prompt": "x", "answer": "{not json"}], "line 1.*not JSON"),
    (["{broken"], "line 1"),
    ([{"prompt": "x", "answer": 42}, {"prompt": "y", "answer": "true"}], "no answer has structural content"),
    ([], "no samples"),
])
def test_bad_sample_files_are_refused_naming_the_line_and_the_fix(tmp_path, rows, match):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=match):
        structured.load_samples(_jsonl(tmp_path / "s.jsonl", rows))


def test_the_spec_and_the_cli_take_the_file_and_check_it_before_any_model_loads(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.eval.gate import load_spec

    _jsonl(tmp_path / "flat.jsonl", [{"prompt": "x", "answer": 1}])
    spec = tmp_path / "spec.yaml"
    spec.write_text("quality:\n  suites:\n    structured: {file: flat.jsonl, max_kld: 0.1}\n")
    assert load_spec(str(spec)).suites["structured"]["file"] == str((tmp_path / "flat.jsonl").resolve())
    r = CliRunner().invoke(app, ["gate", str(spec), "no-such-model", "no-such-model"])
    assert r.exit_code == 2 and "no answer has structural content" in r.output
    r = CliRunner().invoke(app, ["eval", "no-such-model", "no-such-model", "--structured-file",
                                 str(tmp_path / "flat.jsonl")])
    assert r.exit_code == 2 and "no answer has structural content" in r.output
