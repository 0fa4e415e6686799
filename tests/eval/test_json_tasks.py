"""JSON formatting tasks the bundled model can do: built from real articles, scored for validity,
schema and correct values; a real regression (W4 RTN on SmolLM2) drops them, honest INT8 does not."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.eval.suites import json_tasks


def test_tasks_come_from_real_articles_with_their_own_answers():
    todo = json_tasks.tasks(6)
    assert len(todo) == 6 and len({t["id"] for t in todo}) == 6
    for t in todo:
        assert set(t["expected"]) == set(t["schema"]["required"])
        assert all(f'"{k}"' in t["prompt"] for k in t["expected"]) and str(list(t["expected"].values())[1]) in t["prompt"]
    assert todo == json_tasks.tasks(6)  # reproducible


def test_scoring_separates_invalid_mistyped_and_wrong_answers():
    t = {"schema": {"type": "object", "required": ["title", "year"],
                    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}}},
         "expected": {"title": "Aruba", "year": 2010}}
    assert json_tasks.score('```json\n{"title": "Aruba", "year": 2010}\n```', t) == \
        {"valid": True, "schema_valid": True, "correct": True}
    assert json_tasks.score('{"title": "Aruba", "year": "2010"}', t) == \
        {"valid": True, "schema_valid": False, "correct": False}
    assert json_tasks.score('{"title": "Aruba", "year": 2011}', t) == \
        {"valid": True, "schema_valid": True, "correct": False}
    assert json_tasks.score('{"title": "Aruba", "year": 2010,}', t)["valid"] is False  # a trailing comma


@pytest.mark.slow
def test_the_bundled_model_does_the_tasks_and_a_real_regression_shows():
    base = lowbit.load("smollm2-135m")
    honest = json_tasks.run(base, lowbit.quantize(lowbit.load("smollm2-135m"), "int8"), quick=True)
    assert honest.baseline >= 80 and honest.candidate >= honest.baseline - 10
    broken = json_tasks.run(base, lowbit.quantize(lowbit.load("smollm2-135m"), "w4-g128"), quick=True)
    assert broken.candidate <= broken.baseline - 25  # RTN W4 writes trailing commas and quoted numbers here
