"""The server for real: uvicorn on 127.0.0.1 (a free port, in a thread) and the `openai` client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import openai
import pytest
import uvicorn

from lowbit.serve import ServeConfig, create_app
from tests.serve.conftest import Raising, Scripted, tiny_model

KEY = "test-key-123"


@contextlib.contextmanager
def served(config: ServeConfig):
    """uvicorn serving config's app on a loopback socket we bound (so the port is known and free)."""
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_openai_client_chat_completions_streaming_and_errors():
    fb = Scripted('{"answer": 42}', "fb")
    cfg = ServeConfig(candidate=tiny_model(1), fallback=fb, candidate_name="cand", canary=0, api_key=KEY)
    with served(cfg) as (base, app):
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=30)
        models = [m.id for m in client.models.list()]
        assert models == ["lowbit", "cand", "fb"]

        r = client.chat.completions.create(model="lowbit", messages=[{"role": "user", "content": "JSON please"}],
                                           max_tokens=32, response_format={"type": "json_object"})
        assert r.model == "fb" and json.loads(r.choices[0].message.content) == {"answer": 42}
        assert r.usage.completion_tokens > 0

        raw = client.chat.completions.with_raw_response.create(
            model="cand", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert raw.headers["x-lowbit-model"] == "cand" and raw.headers["x-lowbit-reason"] == "pinned"
        whole = raw.parse().choices[0].message.content

        stream = client.chat.completions.create(model="cand", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, stream=True)
        pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
        assert "".join(pieces) == whole and len(pieces) >= 2

        c = client.completions.create(model="cand", prompt="Hello", max_tokens=4, logprobs=1)
        assert c.model == "cand" and len(c.choices[0].logprobs.token_logprobs) == 4
        streamed = "".join(ch.choices[0].text for ch in
                           client.completions.create(model="cand", prompt="Hello", max_tokens=4, stream=True))
        assert streamed == c.choices[0].text

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="lowbit", messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong-key-000", max_retries=0).models.list()
        # still serving after the errors
        assert client.chat.completions.create(model="lowbit", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=3).model == "fb"


def test_openai_client_sees_the_fallback_when_the_candidate_raises():
    cfg = ServeConfig(candidate=Raising("cand"), fallback=Scripted("fine", "fb"), canary=100)
    with served(cfg) as (base, app):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model="lowbit", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert raw.headers["x-lowbit-reason"] == "candidate_error" and raw.parse().choices[0].message.content == "fine"
        stream = client.chat.completions.create(model="lowbit", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, stream=True)
        chunks = list(stream)
        assert {ch.model for ch in chunks} == {"fb"}
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "fine"


def test_run_in_a_subprocess_serves_until_stopped(tiny_dir, tmp_path):
    """lowbit.serve.run as a deployment runs it: its own process, a model folder, SIGTERM to stop."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from lowbit.serve import ServeConfig, run; "
            f"run(ServeConfig(candidate={str(tiny_dir)!r}, fallback={str(tiny_dir)!r}, port={port}, canary=100, "
            "shadow=True, log_level='warning'))")
    env = {**os.environ, "LOWBIT_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the server did not become ready"
            time.sleep(0.2)
        r = httpx.post(base + "/v1/chat/completions", timeout=30,
                       json={"model": "lowbit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "tiny-llama"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a clean shutdown
    # the shutdown recorded the shadow scores of the one request
    from lowbit.report.registry import list_runs

    assert list_runs(kind="serve", db=tmp_path / "runs.sqlite")[0]["candidate"] == "tiny-llama"
