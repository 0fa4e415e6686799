"""lowbit serve in-process (FastAPI's TestClient / httpx on the ASGI app): the OpenAI API, fallback on
bad output, limits and bad requests, routing and the admin endpoint. Tiny random models: fast."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from lowbit.serve import ServeConfig, create_app
from tests.serve.conftest import Blocking, BreaksMidway, Raising, Recording, Scripted, tiny_model

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Reply with a JSON object."}]


def client(**kw) -> TestClient:
    kw.setdefault("candidate", tiny_model(1))
    kw.setdefault("fallback", tiny_model(0))
    kw.setdefault("candidate_name", "cand")
    kw.setdefault("fallback_name", "fb")
    return TestClient(create_app(ServeConfig(**kw)))


def chat(c: TestClient, **body):
    body.setdefault("model", "lowbit")
    body.setdefault("messages", MSG)
    body.setdefault("max_tokens", 6)
    return c.post(CHAT, json=body)


def test_chat_and_completions_follow_the_canary_share():
    with client(canary=100) as c:
        r = chat(c)
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "cand"
        assert r.headers["x-lowbit-model"] == "cand" and r.headers["x-lowbit-reason"] == "canary"
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant" and isinstance(msg["content"], str)
        assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
    with client(canary=0) as c:
        r = c.post("/v1/completions", json={"model": "lowbit", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "fb" and r.headers["x-lowbit-reason"] == "routed"
        assert r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] == 4


def test_pinned_model_logprobs_and_the_same_answer_as_lowbit_generate():
    from lowbit.runtime.decode import lean_generate

    with client(canary=0) as c:
        r = c.post("/v1/completions", json={"model": "cand", "prompt": "Hello", "max_tokens": 5, "logprobs": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "cand" and r.headers["x-lowbit-reason"] == "pinned"
        lp = body["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == 5 and all(x <= 0 for x in lp["token_logprobs"])
        assert all(len(row) <= 2 for row in lp["top_logprobs"])
        # greedy, no repetition penalty: the same tokens as the lean loop on the same prompt
        srv = c.app.state.server
        r2 = c.post("/v1/chat/completions", json={"model": "cand", "messages": MSG, "max_tokens": 5, "logprobs": True,
                                                  "top_logprobs": 1})
        content = r2.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == 5 and all(len(t["top_logprobs"]) == 1 for t in content)
    import torch
    srv.config.repetition_penalty = 1.0
    ids = srv.cand_b.encode_text("Hello")
    want = lean_generate(srv.cand_b.module, torch.tensor([ids]), 5)[0].tolist()
    from lowbit.serve.engine import GenParams
    got = srv.cand_b.generate(ids, GenParams(max_tokens=5, repetition_penalty=1.0))
    assert got.token_ids == want


def test_models_health_ready_metrics():
    with client(canary=25) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["lowbit", "cand", "fb"]
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        chat(c, user="u1")
        text = c.get("/metrics").text
        assert "lowbit_serve_canary_share_percent 25.0" in text
        assert "lowbit_serve_requests_total{" in text


def test_api_key_required_when_set():
    with client(api_key="s3cret-key") as c:
        assert chat(c).status_code == 401
        r = c.post(CHAT, json={"model": "lowbit", "messages": MSG}, headers={"Authorization": "Bearer wrong-key"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 401
        assert c.post("/admin/canary", json={"share": 50}).status_code == 401
        ok = c.post(CHAT, json={"model": "lowbit", "messages": MSG, "max_tokens": 2},
                    headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200


def test_broken_json_from_the_candidate_is_answered_by_the_fallback():
    cand = Scripted('{"city": "Paris", "temp": ', "cand")  # cut off: does not parse
    fb = Scripted('{"city": "Paris", "temp": 21}', "fb")
    with client(candidate=cand, fallback=fb, canary=100) as c:
        r = chat(c, response_format={"type": "json_object"}, max_tokens=64)
        assert r.status_code == 200
        assert r.headers["x-lowbit-model"] == "fb" and r.headers["x-lowbit-reason"] == "json_invalid"
        assert r.json()["model"] == "fb" and json.loads(r.json()["choices"][0]["message"]["content"])["temp"] == 21
        assert cand.calls == 1 and fb.calls == 1 and "x-lowbit-fallback-problem" not in r.headers
        # without response_format the same candidate answer is sent as it is
        r = chat(c, max_tokens=64)
        assert r.headers["x-lowbit-model"] == "cand"
        # streaming: the candidate's answer is checked whole before anything is sent
        r = chat(c, response_format={"type": "json_object"}, max_tokens=64, stream=True)
        assert r.headers["x-lowbit-reason"] == "json_invalid"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in _events(r.text))
        assert json.loads(text) == {"city": "Paris", "temp": 21}
        assert "lowbit_serve_fallbacks_total{reason=\"json_invalid\"} 2.0" in c.get("/metrics").text


def test_schema_violation_and_low_confidence_go_to_the_fallback():
    schema = {"type": "object", "properties": {"temp": {"type": "number"}}, "required": ["temp"]}
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    cand = Scripted('{"temp": "warm"}', "cand")
    fb = Scripted('{"temp": 21}', "fb")
    with client(candidate=cand, fallback=fb, canary=100) as c:
        r = chat(c, response_format=rf, max_tokens=64)
        assert r.headers["x-lowbit-reason"] == "schema_invalid" and r.json()["model"] == "fb"
    # both broken: the fallback's answer is still the one sent, and the response says it fails too
    with client(candidate=Scripted("{", "cand"), fallback=Scripted("no JSON here", "fb"), canary=100) as c:
        r = chat(c, response_format={"type": "json_object"}, max_tokens=16)
        assert r.headers["x-lowbit-reason"] == "json_invalid" and r.headers["x-lowbit-fallback-problem"] == "json_invalid"
        assert r.json()["lowbit"]["fallback_problem"] == "json_invalid"
    unsure = Scripted("maybe", "cand", logprob=-6.0)
    with client(candidate=unsure, fallback=Scripted("sure", "fb"), canary=100, min_mean_logprob=-2.0) as c:
        r = chat(c, max_tokens=16)
        assert r.headers["x-lowbit-reason"] == "low_confidence"
        assert r.json()["choices"][0]["message"]["content"] == "sure"


def test_min_logprob_auto_is_calibrated_from_shadow_pairs():
    from lowbit.serve.guard import calibrate_floor

    # confidence separates bad answers (-3..-4) from good ones (-0.5..-1.5): the floor sits between,
    # at the 2% least confident good answer
    good = [(-0.5 - i / 100, False) for i in range(100)]
    bad = [(-3.0 - i / 10, True) for i in range(10)]
    info = calibrate_floor(good + bad, max_false_pct=2.0, min_pairs=50)
    assert info["floor"] == pytest.approx(-1.47) and info["caught_bad_pct"] == 100 and info["false_fallback_pct"] == 2
    # too few pairs, no bad pair, or bad pairs as confident as good ones: no floor, and it says why
    assert calibrate_floor(good[:10] + bad, min_pairs=50)["floor"] is None
    assert "no bad pair" in calibrate_floor(good, min_pairs=50)["why"]
    assert calibrate_floor(good + [(-0.6, True)], min_pairs=50)["floor"] is None
    with pytest.raises(Exception, match="--shadow"):
        ServeConfig(candidate=None, fallback=None, min_mean_logprob="auto").check()
    # live: shadow pairs whose candidate answer disagrees entirely are scored bad; the floor is set
    # once they are less confident than the good ones, and then low-confidence answers go to the fallback
    cand = Scripted("yes", "cand", logprob=-0.2)
    fb = Scripted("yes", "fb")
    with client(candidate=cand, fallback=fb, canary=100, shadow=True, min_mean_logprob="auto", floor_pairs=5) as c:
        srv = c.app.state.server
        from lowbit.serve.shadow import wait_idle

        for i in range(5):
            assert chat(c, max_tokens=4).headers["x-lowbit-reason"] == "canary"
            wait_idle(srv.scorer, 30)
        assert srv.floor is None and "no bad pair" in srv.floor_info["why"]
        cand.text, cand.logprob = "no way", -5.0
        for i in range(5):
            chat(c, max_tokens=4)
            wait_idle(srv.scorer, 30)
        assert srv.floor == pytest.approx(-0.2) and srv.floor_info["caught_bad_pct"] == 100
        r = chat(c, max_tokens=4)
        assert r.headers["x-lowbit-reason"] == "low_confidence" and r.json()["model"] == "fb"
        state = c.get("/admin/canary").json()["min_logprob"]
        assert state["auto"] and state["floor"] == pytest.approx(-0.2)
        assert "lowbit_serve_min_logprob -0.2" in c.get("/metrics").text


def test_a_candidate_that_raises_or_stalls_is_answered_by_the_fallback():
    cand = Raising("cand")
    with client(candidate=cand, canary=100) as c:
        r = chat(c)
        assert r.status_code == 200 and r.headers["x-lowbit-reason"] == "candidate_error"
        assert r.json()["model"] == "fb" and r.json()["lowbit"] == {"model_role": "fallback", "reason": "candidate_error"}
        r = chat(c, stream=True)
        assert r.status_code == 200 and r.headers["x-lowbit-model"] == "fb"
        assert r.text.rstrip().endswith("data: [DONE]") and {e["model"] for e in _events(r.text)} == {"fb"}
        # pinned to the candidate: its error is the answer (500), and the server keeps serving
        r = c.post(CHAT, json={"model": "cand", "messages": MSG})
        assert r.status_code == 500 and "injected candidate fault" in r.json()["error"]["message"]
        r = c.post(CHAT, json={"model": "cand", "messages": MSG, "stream": True})
        assert r.status_code == 500 and "injected candidate fault" in r.json()["error"]["message"]
        assert chat(c).status_code == 200
    stall = Blocking("cand")
    with client(candidate=stall, canary=100, candidate_timeout_s=0.3) as c:
        r = chat(c)
        assert r.status_code == 200 and r.headers["x-lowbit-reason"] == "candidate_timeout"
        assert stall.started.is_set()
        # the stalled job was cancelled (its should_stop fired), so the candidate is free again
        srv = c.app.state.server
        for _ in range(100):
            if srv.cand_w.depth() == 0:
                break
            threading.Event().wait(0.02)
        assert srv.cand_w.depth() == 0


def _events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_stream_the_candidate_breaks_midway_is_finished_by_the_fallback(mode):
    cand = BreaksMidway("Hello there, friend", "cand", after=3, mode=mode)
    fb = Recording(" and goodbye", "fb")
    with client(candidate=cand, fallback=fb, canary=100, candidate_timeout_s=0.3) as c:
        r = chat(c, max_tokens=30, stream=True)
        assert r.status_code == 200
        events = _events(r.text)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        sent = cand.decode(cand.tokenizer("Hello there, friend", add_special_tokens=False)["input_ids"][:3])
        assert text == sent + " and goodbye"
        models = [e["model"] for e in events if e["choices"][0]["delta"].get("content")]
        assert models[:3] == ["cand"] * 3 and set(models[3:]) == {"fb"}
        why = "candidate_error" if mode == "raise" else "candidate_timeout"
        assert events[-1]["lowbit"] == {"model_role": "fallback", "reason": why, "rescued_after_chars": len(sent)}
        # the fallback continued from the prompt plus the text already sent, within the same max_tokens
        prompt = c.app.state.server.fb_b.encode_chat(MSG)
        (ids, max_tokens), = fb.seen
        done = fb.encode_continuation(sent)
        assert ids == prompt + done and max_tokens == 30 - len(done)
        metrics = c.get("/metrics").text
        assert f'lowbit_serve_fallbacks_total{{reason="{why}"}} 1.0' in metrics
        # pinned to the candidate, the break is the client's: an error event, no rescue
        r = c.post(CHAT, json={"model": "cand", "messages": MSG, "stream": True, "max_tokens": 10}) if mode == "raise" \
            else None
        if r is not None:
            assert "failed mid-answer" in r.text and len(fb.seen) == 1


def test_streaming_sends_the_same_text_as_the_whole_answer():
    with client(canary=0) as c:
        whole = chat(c, max_tokens=8).json()["choices"][0]["message"]["content"]
        r = chat(c, max_tokens=8, stream=True, stream_options={"include_usage": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == whole
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 8
        r = c.post("/v1/completions", json={"model": "lowbit", "prompt": "Hi", "max_tokens": 5, "stream": True})
        assert sum(len(e["choices"][0]["text"]) > 0 for e in _events(r.text)) >= 1


def test_seed_stop_and_top_p():
    with client(canary=0) as c:
        a = chat(c, temperature=1.0, seed=7, max_tokens=12).json()["choices"][0]["message"]["content"]
        b = chat(c, temperature=1.0, seed=7, max_tokens=12).json()["choices"][0]["message"]["content"]
        assert a == b
        others = {chat(c, temperature=1.0, seed=s, max_tokens=12).json()["choices"][0]["message"]["content"]
                  for s in range(8, 12)}
        assert others - {a}, "different seeds never changed the sampled answer"
        stop = next(ch for ch in a[2:] if ch.strip())
        r = chat(c, temperature=1.0, seed=7, max_tokens=12, stop=[stop]).json()["choices"][0]
        assert r["message"]["content"] == a[: a.index(stop)] and r["finish_reason"] == "stop"
        # streamed with the stop string: nothing past it leaks out, even in pieces
        s = chat(c, temperature=1.0, seed=7, max_tokens=12, stop=stop, stream=True)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in _events(s.text)) == a[: a.index(stop)]
        top = chat(c, temperature=1.0, top_p=1e-6, seed=3, max_tokens=6).json()["choices"][0]["message"]["content"]
        greedy = chat(c, temperature=0.0, max_tokens=6).json()["choices"][0]["message"]["content"]
        assert top == greedy  # a tiny nucleus keeps only the top token


BAD = [
    ({"model": "lowbit", "messages": "hello"}, 400, "messages"),
    ({"model": "lowbit", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "lowbit", "messages": MSG, "max_tokens": "lots"}, 400, "max_tokens"),
    ({"model": "lowbit", "messages": MSG, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "lowbit", "messages": MSG, "max_tokens": 100_000}, 400, "max_tokens"),
    ({"model": "lowbit", "messages": MSG, "temperature": 5}, 400, "temperature"),
    ({"model": "gpt-17", "messages": MSG}, 404, "gpt-17"),
    ({"model": "lowbit", "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "prompt tokens"),
    ({"model": "lowbit", "messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ({"model": "lowbit", "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, 400, "not a valid JSON schema"),
    ({"model": "lowbit", "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "https://example.com/s.json"}}}}, 400, "offline"),
    ({"model": "lowbit", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "lowbit", "messages": MSG, "n": 3}, 400, "n"),
    ({"model": "lowbit", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "text parts"),
    ({"model": "lowbit", "messages": MSG, "max_tokens": 250}, 400, "context"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[w for _, _, w in BAD])
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(body, status, words, bad_client):
    r = bad_client.post(CHAT, json=body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert words.lower() in msg.lower(), msg
    assert chat(bad_client, max_tokens=2).status_code == 200


def test_malformed_json_body_and_oversized_body(bad_client):
    r = bad_client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = bad_client.post(CHAT, content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.fixture(scope="module")
def bad_client():
    with client(canary=50, max_prompt_tokens=1000, max_tokens_limit=1000) as c:
        yield c


def test_queue_full_gives_429_with_retry_after():
    blocker = Blocking("fb")

    async def scenario():
        app = create_app(ServeConfig(candidate=tiny_model(1), fallback=blocker, candidate_name="cand", canary=0,
                                     queue_size=1))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            body = {"model": "lowbit", "messages": MSG, "max_tokens": 2}
            first = asyncio.ensure_future(c.post(CHAT, json=body))  # running on the worker
            while not blocker.started.is_set():
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(c.post(CHAT, json=body))  # waits in the queue (size 1)
            srv = app.state.server
            while srv.fb_w.clients.qsize() < 1:
                await asyncio.sleep(0.01)
            third = await c.post(CHAT, json=body)
            blocker.release.set()
            ok = await asyncio.gather(first, second)
            metrics = (await c.get("/metrics")).text
            srv.close()
            return third, ok, metrics

    third, ok, metrics = asyncio.run(scenario())
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert "queue is full" in third.json()["error"]["message"]
    assert [r.status_code for r in ok] == [200, 200]
    assert 'lowbit_serve_rejected_total{why="queue_full"} 1.0' in metrics


def test_sticky_routing_and_the_admin_endpoint():
    with client(canary=50, api_key="admin-key-1") as c:
        h = {"Authorization": "Bearer admin-key-1"}
        for user in ("alice", "bob", "carol", "dave"):
            seen = {chat_h(c, h, user=user).headers["x-lowbit-model"] for _ in range(3)}
            assert len(seen) == 1, f"{user} moved between models: {seen}"
        conv = {chat_h(c, {**h, "x-conversation-id": "conv-9"}).headers["x-lowbit-model"] for _ in range(3)}
        assert len(conv) == 1
        r = c.post("/admin/canary", json={"share": 100}, headers=h)
        assert r.status_code == 200 and r.json()["share"] == 100
        assert {chat_h(c, h, user=u).headers["x-lowbit-model"] for u in ("alice", "bob", "carol")} == {"cand"}
        assert "lowbit_serve_canary_share_percent 100.0" in c.get("/metrics").text
        assert c.post("/admin/canary", json={"share": 140}, headers=h).status_code == 400
        c.post("/admin/canary", json={"share": 0}, headers=h)
        assert {chat_h(c, h, user=u).headers["x-lowbit-model"] for u in ("alice", "bob")} == {"fb"}
        assert [e["why"] for e in c.get("/admin/canary", headers=h).json()["history"]] == ["start", "admin", "admin"]


def chat_h(c, headers, **body):
    return c.post(CHAT, json={"model": "lowbit", "messages": MSG, "max_tokens": 1, **body}, headers=headers)


def test_raising_the_share_only_moves_users_to_the_candidate():
    from lowbit.serve.routing import Router

    r = Router(20)
    users = [f"user-{i}" for i in range(400)]
    before = {u for u in users if r.to_candidate(u)}
    r.set_share(50, "test")
    after = {u for u in users if r.to_candidate(u)}
    assert before <= after and 0.1 < len(before) / 400 < 0.3 and 0.4 < len(after) / 400 < 0.6


def test_served_from_a_folder(tiny_dir):
    with TestClient(create_app(ServeConfig(candidate=tiny_dir, fallback=tiny_dir, canary=100))) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["lowbit", "tiny-llama", "tiny-llama-fallback"]
        assert chat(c).json()["model"] == "tiny-llama"


def test_config_errors_name_the_option():
    from lowbit.errors import LowbitError

    for kw, words in (({"canary": 120}, "--canary"), ({"queue_size": 0}, "--queue-size"),
                      ({"api_key": "short"}, "--api-key"), ({"port": "80"}, "--port")):
        with pytest.raises(LowbitError, match=words):
            ServeConfig(candidate=None, fallback=None, **kw).check()


def test_request_timeout_gives_504_and_the_worker_is_freed():
    stall = Blocking("cand")
    with client(candidate=stall, canary=0, timeout_s=0.3) as c:
        r = c.post(CHAT, json={"model": "cand", "messages": MSG, "max_tokens": 2})
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        stall.release.set()
        assert chat(c, max_tokens=2).status_code == 200


def test_run_serves_the_app_on_loopback_by_default(monkeypatch):
    import uvicorn

    import lowbit.serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    lowbit.serve.run(ServeConfig(candidate=tiny_model(1), fallback=tiny_model(0), candidate_name="c", fallback_name="f"))
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert seen["app"].state.server.names == {"candidate": "c", "fallback": "f"}
    seen["app"].state.server.close()


def test_waiting_requests_are_decoded_as_one_batch_with_the_same_answers():
    hold = threading.Event()
    prompts = ["Hi", "A longer prompt here", "Mid one", "x"]

    async def scenario(max_batch: int):
        app = create_app(ServeConfig(candidate=tiny_model(1), fallback=tiny_model(0), candidate_name="cand",
                                     canary=0, max_batch=max_batch, repetition_penalty=1.0))
        srv = app.state.server
        sizes = []
        orig = srv.fb_b.generate_batch
        srv.fb_b.generate_batch = lambda items: (sizes.append(len(items)), orig(items))[1]
        hold.clear()
        srv.fb_w.submit(lambda b, stop: hold.wait(10))  # keeps the worker busy while the requests queue
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/completions", json={"model": "lowbit", "prompt": p,
                                                                            "max_tokens": 6 + i}))
                     for i, p in enumerate(prompts)]
            while srv.fb_w.clients.qsize() < len(prompts):
                await asyncio.sleep(0.01)
            hold.set()
            answers = [(await t).json()["choices"][0]["text"] for t in tasks]
        srv.close()
        return answers, sizes

    batched, sizes = asyncio.run(scenario(4))
    single, single_sizes = asyncio.run(scenario(1))
    assert sizes == [4] and single_sizes == [1, 1, 1, 1]
    assert batched == single


def test_fuzzed_request_bodies_never_get_a_5xx():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                       st.lists(st.text(max_size=5), max_size=6),
                       st.dictionaries(st.sampled_from(["type", "json_schema", "role", "content", "schema", "name"]),
                                       st.one_of(st.text(max_size=10), st.integers(), st.dictionaries(
                                           st.text(max_size=5), st.text(max_size=5), max_size=2)), max_size=3))
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bogus"]),
                                     "content": st.one_of(st.text(max_size=40), values)})
    fields = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["lowbit", "cand", "fb", "other", ""]), "messages": st.one_of(st.lists(message, max_size=3), values),
        "max_tokens": values, "temperature": values, "top_p": values, "stop": values, "seed": values,
        "stream": st.booleans(), "logprobs": values, "top_logprobs": values, "response_format": values,
        "user": values, "n": values})
    with client(canary=50, default_max_tokens=2, max_tokens_limit=3) as c:
        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(fields)
        def check(body):
            r = c.post(CHAT, json=body)
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.status_code != 200:
                assert r.json()["error"]["message"]

        check()
        assert chat(c, max_tokens=2).status_code == 200


def test_nan_and_infinity_in_the_body_are_refused(bad_client):
    for field in ("temperature", "top_p", "max_tokens", "seed"):
        for lit in ("NaN", "Infinity", "-Infinity"):
            raw = '{"model": "lowbit", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field, lit)
            r = bad_client.post(CHAT, content=raw.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (field, lit, r.text)


def test_framework_errors_come_in_the_openai_error_shape(bad_client):
    r = bad_client.post(CHAT, content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "parsing the body" in r.json()["error"]["message"]
    assert bad_client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert bad_client.get(CHAT).status_code == 405
