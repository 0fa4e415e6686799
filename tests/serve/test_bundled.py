"""Slow: lowbit serve with the bundled SmolLM2-135M, through uvicorn and the `openai` client."""

from __future__ import annotations

import copy
import json

import openai
import pytest
import torch

from lowbit.serve import ServeConfig
from tests.serve.test_uvicorn import served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    import lowbit

    try:
        return lowbit.load("smollm2-135m")
    except lowbit.LowbitError as e:  # the bundled model's package is not installed
        pytest.skip(str(e))


def damaged(model):
    """A copy whose Linear weights are scaled into garbage: it still runs, it writes nonsense."""
    bad = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bad.module.named_parameters():
            if p.ndim == 2 and "proj" in name:
                p.mul_(1 + 8 * torch.randn(p.shape, generator=g))
    return bad


def test_bundled_model_answers_through_the_openai_client(smollm):
    cfg = ServeConfig(candidate=smollm, fallback=smollm, candidate_name="smollm2-cand", fallback_name="smollm2-fp32",
                      canary=100)
    with served(cfg) as (base, app):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="lowbit", messages=msgs, max_tokens=16)
        assert r.model == "smollm2-cand" and "paris" in r.choices[0].message.content.lower()
        pieces = [ch.choices[0].delta.content or "" for ch in
                  client.chat.completions.create(model="lowbit", messages=msgs, max_tokens=16, stream=True) if ch.choices]
        assert "".join(pieces) == r.choices[0].message.content


def test_damaged_candidate_json_is_answered_by_the_fallback(smollm):
    prompt = 'Write a JSON object with keys "city" and "country" for Paris. Output only JSON.'
    cfg = ServeConfig(candidate=damaged(smollm), fallback=smollm, candidate_name="broken", fallback_name="smollm2-fp32",
                      canary=100)
    with served(cfg) as (base, app):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": prompt}]
        garbage = client.chat.completions.create(model="broken", messages=msgs, max_tokens=48).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(garbage)
        raw = client.chat.completions.with_raw_response.create(model="lowbit", messages=msgs, max_tokens=48,
                                                               response_format={"type": "json_object"})
        r = raw.parse()
        assert raw.headers["x-lowbit-reason"] == "json_invalid" and r.model == "smollm2-fp32"
        direct = client.chat.completions.create(model="smollm2-fp32", messages=msgs, max_tokens=48)
        assert r.choices[0].message.content == direct.choices[0].message.content
