"""The OpenAI-compatible HTTP API: FastAPI app factory, request checks, routing, fallback, streaming.

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health (the process answers), GET /ready (models loaded, workers running), GET /metrics
(Prometheus), GET/POST /admin/canary (the canary share, behind the API key).

Every answer says which model gave it and why: the `model` field, and the headers x-lowbit-model and
x-lowbit-reason (canary, routed, pinned, or the candidate's failure that sent it to the fallback).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.errors import LowbitError
from lowbit.serve import guard
from lowbit.serve.config import ServeConfig
from lowbit.serve.engine import Backend, GenParams, GenResult, ModelWorker, QueueFull, load_backend
from lowbit.serve.routing import Router
from lowbit.serve.shadow import Pair, ShadowScorer

log = logging.getLogger("lowbit.serve")

MAX_BODY_BYTES = 4 << 20  # a request body; beyond it 413 before anything is parsed
MAX_STOP = 4  # as OpenAI: at most four stop strings
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 5
CHARS_PER_TOKEN_BOUND = 32  # prompts longer than this many characters per allowed token are refused untokenized


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields this server ignores (e.g. metadata)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # greedy by default, as `lowbit generate`
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=512)
    response_format: dict | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class CanaryBody(BaseModel):
    share: float = Field(ge=0, le=100)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- the server state -----------------------------------------------------------------------------
@dataclass
class Answer:
    result: GenResult
    role: str  # "candidate" or "fallback"
    reason: str
    fallback_problem: str | None = None  # the fallback's answer fails the check that replaced the candidate's


class Server:
    """Models, workers, router, shadow scorer and metrics of one app."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config.check()
        spec = None
        if config.spec:  # a bad spec fails before any model loads
            from lowbit.eval.gate import load_spec

            spec = load_spec(config.spec)
        self.cand_b = load_backend(config.candidate, config.candidate_name)
        self.fb_b = load_backend(config.fallback, config.fallback_name)
        if self.cand_b.name == self.fb_b.name:
            self.fb_b.name = self.fb_b.name + "-fallback"  # two ids: each model can be pinned
        self.names = {"candidate": self.cand_b.name, "fallback": self.fb_b.name}
        if config.served_name in self.names.values():
            raise LowbitError(f"serve: the routed model id '{config.served_name}' is also a model's own id; "
                              f"fix: pass another --served-name")
        threads = config.threads or max(1, (os.cpu_count() or 2) // 2)  # the two models share the cores
        self.cand_w = ModelWorker(self.cand_b, config.queue_size, config.shadow_queue_size, config.max_batch, threads)
        self.fb_w = ModelWorker(self.fb_b, config.queue_size, config.shadow_queue_size, config.max_batch, threads)
        self.router = Router(config.canary)
        self.analysis = None
        self.scorer = None
        if spec is not None:
            from lowbit.serve.analysis import CanaryAnalysis

            self.analysis = CanaryAnalysis(spec, self.router, config.window, config.step_pct,
                                           config.max_canary, config.max_failures,
                                           record=lambda d: self.record({"decision": d}))
        # the confidence floor in force: the number given, or (auto) the one calibrated from shadow pairs
        self.auto_floor = config.min_mean_logprob == "auto"
        self.floor = None if self.auto_floor else config.min_mean_logprob
        self.floor_info: dict | None = None
        self._floor_seen = 0
        if config.shadow:
            self.scorer = ShadowScorer(self.cand_w, self.fb_w, config.shadow_queue_size, config.shadow_max_tokens,
                                       on_score=self.on_score,
                                       record=lambda s: self.record({"shadow": s}), record_every=config.record_every,
                                       job_timeout_s=config.timeout_s)
        self.started = time.time()
        self._metrics()

    def on_score(self, s) -> None:
        """Each scored shadow pair: the canary analysis sees it; with --min-logprob auto the floor is
        recalibrated every `floor_pairs` pairs from every pair kept."""
        if self.analysis:
            self.analysis.observe_pair(s)
        if not self.auto_floor:
            return
        self._floor_seen += 1
        if self._floor_seen % self.config.floor_pairs:
            return
        with self.scorer.lock:
            pairs = list(self.scorer.pairs)
        samples = [(p.candidate_mean_logprob, guard.bad_pair(p.token_agreement, p.json_asked, p.candidate_json_ok,
                                                             p.fallback_json_ok))
                   for p in pairs if p.candidate_mean_logprob is not None]
        info = guard.calibrate_floor(samples, self.config.floor_false_pct, self.config.floor_pairs)
        if info["floor"] != self.floor:
            log.info("--min-logprob auto: floor %s -> %s (%s)", self.floor, info["floor"], info["why"])
        self.floor, self.floor_info = info["floor"], info
        self.record({"floor": info})

    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()  # one per app: several apps (tests) never collide
        self.m_requests = Counter("lowbit_serve_requests", "Requests answered, by endpoint, model, reason and status",
                                  ["endpoint", "model", "reason", "status"], registry=r)
        self.m_latency = Histogram("lowbit_serve_request_seconds", "Time to the full answer, by model",
                                   ["endpoint", "model"], registry=r,
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.m_fallbacks = Counter("lowbit_serve_fallbacks", "Candidate answers replaced by the fallback's, by reason",
                                   ["reason"], registry=r)
        self.m_rejected = Counter("lowbit_serve_rejected", "Requests refused, by why", ["why"], registry=r)
        self.m_tokens = Counter("lowbit_serve_generated_tokens", "Tokens generated for clients, by model", ["model"],
                                registry=r)
        share = Gauge("lowbit_serve_canary_share_percent", "Percent of routed traffic sent to the candidate", registry=r)
        share.set_function(lambda: self.router.share)
        floor = Gauge("lowbit_serve_min_logprob", "The confidence floor in force (NaN: none)", registry=r)
        floor.set_function(lambda: float("nan") if self.floor is None else self.floor)
        depth = Gauge("lowbit_serve_queue_depth", "Client jobs waiting or running, by model", ["model"], registry=r)
        depth.labels(model=self.cand_b.name).set_function(self.cand_w.depth)
        depth.labels(model=self.fb_b.name).set_function(self.fb_w.depth)
        if self.scorer:
            counts = Gauge("lowbit_serve_shadow_pairs", "Shadow pairs by outcome", ["outcome"], registry=r)
            for k in self.scorer.counts:
                counts.labels(outcome=k).set_function(lambda k=k: self.scorer.counts[k])
            scores = Gauge("lowbit_serve_shadow_score", "Shadow scores over the last 10,000 pairs", ["score"], registry=r)
            for k in ("mean_kld", "p99_kld", "top1", "token_agreement", "candidate_json_valid_pct",
                      "fallback_json_valid_pct", "candidate_mean_logprob_p05"):
                scores.labels(score=k).set_function(lambda k=k: float("nan") if (v := self.scorer.summary()[k]) is None else v)

    def record(self, extra: dict) -> None:
        from lowbit.report.registry import record
        from lowbit.version import __version__

        run = {"kind": "serve", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "lowbit_version": __version__,
               "baseline": {"name": self.fb_b.name}, "candidate": {"name": self.cand_b.name},
               "serve": {"canary_share": self.router.share, "shadow": self.config.shadow, "spec": self.config.spec,
                         "uptime_s": round(time.time() - self.started, 1), **extra}}
        s = extra.get("shadow")
        if s:  # the listing's mean_kld / top1 columns show the live scores
            run["divergence"] = {"mean_kld": s.get("mean_kld"), "top1": s.get("top1")}
        d = extra.get("decision")
        if d:  # a canary decision: the window's scores, and passed = the window held
            rows = {r["name"]: r["value"] for r in d["criteria"]}
            run["divergence"] = {"mean_kld": rows.get("mean KLD"), "top1": rows.get("top-1 agreement")}
            run["gate"] = {"passed": not any(r["passed"] is False for r in d["criteria"])}
        record(run, db=self.config.registry_db)

    def worker(self, role: str) -> ModelWorker:
        return self.cand_w if role == "candidate" else self.fb_w

    def backend(self, role: str) -> Backend:
        return self.cand_b if role == "candidate" else self.fb_b

    def close(self) -> None:
        if self.scorer:
            self.scorer.close()
        self.cand_w.close()
        self.fb_w.close()


# -- request handling -----------------------------------------------------------------------------
def _content_text(m: ChatMessage, i: int) -> str:
    c = m.content
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    parts = []
    for j, part in enumerate(c):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are served (type 'text' with a 'text' "
                                f"string); got type {part.get('type')!r}", param=f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    return stops


class Prepared:
    """A checked request: the prompt (as text or messages), the generation parameters, what JSON was asked."""

    def __init__(self, srv: Server, body: _Body, endpoint: str, headers) -> None:
        cfg = srv.config
        self.endpoint, self.stream = endpoint, body.stream
        self.include_usage = bool((body.stream_options or {}).get("include_usage"))
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        names = srv.names
        if body.model in (None, cfg.served_name):
            self.pinned = None
        elif body.model in names.values():
            self.pinned = next(role for role, n in names.items() if n == body.model)
        else:
            raise ApiError(404, f"model: '{body.model}' is not served here; fix: use '{cfg.served_name}' (routed), "
                                f"'{names['candidate']}' or '{names['fallback']}'", param="model", code="model_not_found")
        max_tokens = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        self.explicit_max = max_tokens is not None  # a default is cut to fit the context, an explicit ask is not
        max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens: {max_tokens} is more than this server generates in one answer "
                                f"({cfg.max_tokens_limit}); fix: ask for {cfg.max_tokens_limit} or fewer",
                           param="max_tokens")
        top = 0
        if isinstance(body, ChatBody):
            if body.top_logprobs and not body.logprobs:
                raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
            self.logprobs, top = body.logprobs, body.top_logprobs or 0
            self.messages = [{"role": m.role, "content": _content_text(m, i)} for i, m in enumerate(body.messages)]
            chars = sum(len(m["content"]) for m in self.messages)
        else:
            if isinstance(body.prompt, list):
                if len(body.prompt) != 1:
                    raise ApiError(400, "prompt: one prompt per request (a string, or a list of one string)",
                                   param="prompt")
                body.prompt = body.prompt[0]
            if body.echo:
                raise ApiError(400, "echo: not supported; fix: leave it false", param="echo")
            self.logprobs, top = body.logprobs is not None, body.logprobs or 0
            self.messages = None
            self.text = body.prompt
            chars = len(body.prompt)
        if chars > cfg.max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
            raise ApiError(400, f"prompt: {chars} characters, far more than the {cfg.max_prompt_tokens} prompt tokens "
                                f"this server takes; fix: shorten it", param="messages" if self.messages else "prompt")
        if self.stream and self.logprobs:
            raise ApiError(400, "logprobs: not served with stream: true; fix: ask for one of them", param="logprobs")
        try:
            self.ask = guard.parse_response_format(body.response_format)
        except LowbitError as e:
            raise ApiError(400, str(e), param="response_format") from None
        self.params = GenParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=_stops(body.stop), seed=body.seed, repetition_penalty=cfg.repetition_penalty,
                                top_logprobs=top)
        self.key = body.user or headers.get("x-conversation-id") or None
        self._ids: dict[str, list[int]] = {}
        self.srv = srv

    def ids(self, role: str) -> list[int]:
        """The prompt as the model of `role` reads it (models may differ in tokenizer or chat template)."""
        if role not in self._ids:
            b = self.srv.backend(role)
            ids = b.encode_chat(self.messages) if self.messages is not None else b.encode_text(self.text)
            cfg, p = self.srv.config, "messages" if self.messages is not None else "prompt"
            if not ids:
                raise ApiError(400, f"{p}: empty prompt; fix: send some text", param=p)
            if len(ids) > cfg.max_prompt_tokens:
                raise ApiError(400, f"{p}: {len(ids)} prompt tokens, more than this server takes "
                                    f"({cfg.max_prompt_tokens}); fix: shorten it", param=p)
            if b.context is not None and len(ids) + self.params.max_tokens > b.context and not self.explicit_max \
                    and len(ids) < b.context:
                self.params.max_tokens = b.context - len(ids)
            if b.context is not None and len(ids) + self.params.max_tokens > b.context:
                raise ApiError(400, f"max_tokens: {len(ids)} prompt tokens + max_tokens {self.params.max_tokens} exceed "
                                    f"the model's context of {b.context} tokens; fix: ask for at most "
                                    f"{max(0, b.context - len(ids))} tokens or shorten the prompt", param="max_tokens")
            self._ids[role] = ids
        return self._ids[role]


def _retry(srv: Server, role: str) -> ApiError:
    srv.m_rejected.labels(why="queue_full").inc()
    w = srv.worker(role)
    return ApiError(429, f"the {role} model's queue is full ({srv.config.queue_size} requests); retry later",
                    kind="rate_limit_error", code="queue_full", headers={"Retry-After": str(w.retry_after_s())})


async def _run(srv: Server, role: str, prep: Prepared, timeout: float, on_text=None) -> GenResult:
    """Generate on the role's worker; raises QueueFull, asyncio.TimeoutError or the model's error."""
    ids, params = prep.ids(role), prep.params
    job = srv.worker(role).submit_generate(ids, params, on_text)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), max(0.001, timeout))
    except BaseException:
        job.cancelled.set()  # the worker stops at the next token
        raise


def _needs_whole_answer(srv: Server, prep: Prepared) -> bool:
    """The candidate's answer must be seen whole before it is sent (JSON asked, or a confidence floor)."""
    return prep.ask is not None or srv.floor is not None


def _route(srv: Server, prep: Prepared) -> str:
    return prep.pinned or ("candidate" if srv.router.to_candidate(prep.key) else "fallback")


async def _answer(srv: Server, prep: Prepared, deadline: float, role: str | None = None) -> Answer:
    """The whole answer: candidate first when routed there, the fallback when it fails any check."""
    role = role or _route(srv, prep)
    cand = None
    if role == "candidate":
        limit = deadline - time.monotonic()
        if not prep.pinned:  # a routed request keeps time for the fallback
            limit = min(limit, srv.config.candidate_timeout_s)
        try:
            cand = await _run(srv, "candidate", prep, limit)
            why = None if prep.pinned else guard.problem(cand, prep.ask, srv.floor)
        except QueueFull:
            if prep.pinned:
                raise _retry(srv, "candidate") from None
            why = guard.BUSY
        except asyncio.TimeoutError:
            if prep.pinned:
                raise
            why = guard.TIMEOUT
        except ApiError:
            raise
        except Exception as e:
            if prep.pinned:
                raise
            log.warning("candidate failed: %s: %s", type(e).__name__, e)
            why = guard.ERROR
        if why is None:
            ans = Answer(cand, "candidate", guard.PINNED if prep.pinned else guard.ROUTED)
            _shadow(srv, prep, cand, None)
            return ans
        srv.m_fallbacks.labels(reason=why).inc()
        try:
            fb = await _run(srv, "fallback", prep, deadline - time.monotonic())
        except QueueFull:
            raise _retry(srv, "fallback") from None
        if cand is not None:
            _shadow(srv, prep, cand, fb)  # both answers exist already: score them without replaying
        # the fallback's answer is sent as it is; say so when it fails the same check
        return Answer(fb, "fallback", why, guard.problem(fb, prep.ask, None))
    try:
        fb = await _run(srv, "fallback", prep, deadline - time.monotonic())
    except QueueFull:
        raise _retry(srv, "fallback") from None
    _shadow(srv, prep, None, fb)
    return Answer(fb, "fallback", guard.PINNED if prep.pinned else guard.ROUTED_FALLBACK)


def _shadow(srv: Server, prep: Prepared, cand: GenResult | None, fb: GenResult | None) -> None:
    if srv.scorer is None or prep.pinned:
        return
    try:
        ids = prep.ids("fallback" if fb is not None else "candidate")
        if prep.ids("candidate") != prep.ids("fallback"):
            return  # different tokenizations: token-level scores would compare different things
    except ApiError:
        return
    srv.scorer.submit(Pair(ids, prep.params, prep.ask, cand, fb))


def _token_str(b: Backend, t: int) -> str:
    return b.tokenizer.decode([t])


def _logprobs(srv: Server, prep: Prepared, ans: Answer) -> dict | None:
    if not prep.logprobs:
        return None
    b, r = srv.backend(ans.role), ans.result
    if prep.endpoint == "chat":
        content = []
        for i, (t, lp) in enumerate(zip(r.token_ids, r.logprobs)):
            s = _token_str(b, t)
            tops = [{"token": _token_str(b, a), "logprob": v, "bytes": list(_token_str(b, a).encode())}
                    for a, v in (r.top_logprobs[i] if i < len(r.top_logprobs) else [])]
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": tops})
        return {"content": content}
    tokens = [_token_str(b, t) for t in r.token_ids]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": r.logprobs,
            "top_logprobs": [{_token_str(b, a): v for a, v in row} for row in r.top_logprobs] or None,
            "text_offset": offsets}


def _usage(r: GenResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
            "total_tokens": r.prompt_tokens + len(r.token_ids)}


def _body(srv: Server, prep: Prepared, ans: Answer) -> dict:
    r, name = ans.result, srv.names[ans.role]
    if prep.endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": _logprobs(srv, prep, ans),
                  "finish_reason": r.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": r.text, "logprobs": _logprobs(srv, prep, ans), "finish_reason": r.finish_reason}
        obj = "text_completion"
    return {"id": prep.id, "object": obj, "created": prep.created, "model": name, "choices": [choice],
            "usage": _usage(r), "lowbit": {"model_role": ans.role, "reason": ans.reason,
                                           **({"fallback_problem": ans.fallback_problem} if ans.fallback_problem else {})}}


def _headers(srv: Server, role: str, reason: str, fallback_problem: str | None = None) -> dict:
    h = {"x-lowbit-model": srv.names[role], "x-lowbit-role": role, "x-lowbit-reason": reason}
    if fallback_problem:
        h["x-lowbit-fallback-problem"] = fallback_problem
    return h


def _chunk(prep: Prepared, name: str, text: str | None, finish: str | None, first: bool = False) -> str:
    if prep.endpoint == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return "data: " + json.dumps({"id": prep.id, "object": obj, "created": prep.created, "model": name,
                                  "choices": [choice]}) + "\n\n"


def _usage_chunk(prep: Prepared, name: str, r: GenResult) -> str:
    obj = "chat.completion.chunk" if prep.endpoint == "chat" else "text_completion"
    return "data: " + json.dumps({"id": prep.id, "object": obj, "created": prep.created, "model": name,
                                  "choices": [], "usage": _usage(r)}) + "\n\n"


async def _stream(srv: Server, prep: Prepared, deadline: float, done) -> StreamingResponse:
    """Server-sent events. Where the candidate's answer must be checked whole (JSON, a confidence floor)
    it is generated first and then sent; otherwise text goes out as it is made. A routed candidate that
    fails before its first piece is replaced by the fallback; one that fails, or stalls for longer than
    its timeout, after text was sent is continued by the fallback from that text (the last event's
    `lowbit` field says so)."""
    role = _route(srv, prep)
    if role == "candidate" and (_needs_whole_answer(srv, prep) and not prep.pinned):
        ans = await _answer(srv, prep, deadline, role)
        name = srv.names[ans.role]

        async def whole():
            yield _chunk(prep, name, "", None, first=True)
            if ans.result.text:
                yield _chunk(prep, name, ans.result.text, None)
            yield _chunk(prep, name, None, ans.result.finish_reason)
            if prep.include_usage:
                yield _usage_chunk(prep, name, ans.result)
            yield "data: [DONE]\n\n"
            done(ans.role, ans.reason, ans.result, 200)

        return StreamingResponse(whole(), media_type="text/event-stream",
                                 headers=_headers(srv, ans.role, ans.reason, ans.fallback_problem))

    loop = asyncio.get_running_loop()
    reason = guard.PINNED if prep.pinned else (guard.ROUTED if role == "candidate" else guard.ROUTED_FALLBACK)

    async def start(role: str, ids: list[int] | None = None, params: GenParams | None = None):
        pieces: asyncio.Queue = asyncio.Queue()
        ids, params = ids or prep.ids(role), params or prep.params

        def on_text(s: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, s)

        job = srv.worker(role).submit_generate(ids, params, on_text)
        fut = asyncio.wrap_future(job.future)
        getter = asyncio.ensure_future(pieces.get())
        first_wait = srv.config.candidate_timeout_s if role == "candidate" and not prep.pinned else None
        timeout = min(deadline - time.monotonic(), first_wait or 1e9)
        doneset, _ = await asyncio.wait({getter, fut}, timeout=max(0.001, timeout), return_when=asyncio.FIRST_COMPLETED)
        if not doneset:
            job.cancelled.set()
            getter.cancel()
            raise asyncio.TimeoutError()
        if fut in doneset and fut.exception() is not None and getter not in doneset:
            getter.cancel()
            raise fut.exception()
        return job, fut, pieces, getter

    try:
        try:
            job, fut, pieces, getter = await start(role)
        except QueueFull:
            if role == "candidate" and not prep.pinned:
                why = guard.BUSY
            else:
                raise _retry(srv, role) from None
        except asyncio.TimeoutError:
            if role != "candidate" or prep.pinned:
                raise
            why = guard.TIMEOUT
        except ApiError:
            raise
        except Exception as e:
            if role != "candidate" or prep.pinned:
                raise
            log.warning("candidate failed: %s: %s", type(e).__name__, e)
            why = guard.ERROR
        else:
            why = None
        if why is not None:
            srv.m_fallbacks.labels(reason=why).inc()
            role, reason = "fallback", why
            try:
                job, fut, pieces, getter = await start(role)
            except QueueFull:
                raise _retry(srv, role) from None
    except asyncio.TimeoutError:
        raise ApiError(504, f"no answer within the request timeout ({srv.config.timeout_s:g} s)", kind="timeout",
                       code="timeout") from None
    name = srv.names[role]

    async def rescue(why: str, sent: str):
        """The routed candidate failed or stalled after text was sent: the fallback continues the answer
        from what the client already has (its prompt plus the text sent, within the same max_tokens)."""
        fb = srv.backend("fallback")
        done_ids = fb.encode_continuation(sent)
        left = prep.params.max_tokens - len(done_ids)
        if left <= 0:
            return None
        srv.m_fallbacks.labels(reason=why).inc()
        log.warning("candidate %s mid-answer after %d characters: the fallback continues", why, len(sent))
        from dataclasses import replace as _replace

        return await start("fallback", prep.ids("fallback") + done_ids, _replace(prep.params, max_tokens=left))

    async def events():
        nonlocal getter, fut, job, pieces, role, reason, name
        sent, rescued = "", None
        try:
            yield _chunk(prep, name, "", None, first=True)
            while True:
                can_rescue = role == "candidate" and not prep.pinned and rescued is None
                why = None
                while True:
                    if getter.done():
                        piece = getter.result()
                        sent += piece
                        yield _chunk(prep, name, piece, None)
                        getter = asyncio.ensure_future(pieces.get())
                        continue
                    if fut.done() and pieces.empty():
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise asyncio.TimeoutError()
                    # a routed candidate may not stall between pieces for longer than its own timeout
                    wait = min(left, srv.config.candidate_timeout_s) if can_rescue else left
                    got, _ = await asyncio.wait({getter, fut}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    if not got and can_rescue and wait < left:
                        why = guard.TIMEOUT
                        job.cancelled.set()
                        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # its Cancelled is expected
                        break
                getter.cancel()
                r = None
                if why is None:
                    try:
                        r = fut.result()
                    except Exception as e:
                        if not can_rescue:
                            done(role, reason, None, 500)
                            yield "data: " + json.dumps(error_body(f"the {role} model failed mid-answer: {e}",
                                                                   "server_error")) + "\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        log.warning("candidate failed mid-answer: %s: %s", type(e).__name__, e)
                        why = guard.ERROR
                if why is not None:  # hand the rest of the answer to the fallback
                    try:
                        nxt = await rescue(why, sent)
                    except (QueueFull, asyncio.TimeoutError, Exception) as e:
                        done(role, reason, None, 500)
                        yield "data: " + json.dumps(error_body(f"the candidate failed mid-answer ({why}) and the "
                                                               f"fallback could not continue it: {e}",
                                                               "server_error")) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    rescued = {"model_role": "fallback", "reason": why, "rescued_after_chars": len(sent)}
                    role, reason, name = "fallback", why, srv.names["fallback"]
                    if nxt is None:  # the candidate had used up max_tokens already
                        r = GenResult("", [], [], "length", 0, 0.0)
                    else:
                        job, fut, pieces, getter = nxt
                        continue
                break
            end = _chunk(prep, name, None, r.finish_reason)
            if rescued:  # the last event says who finished the answer and why
                obj = json.loads(end[len("data: "):])
                end = "data: " + json.dumps(obj | {"lowbit": rescued}) + "\n\n"
            yield end
            if prep.include_usage:
                yield _usage_chunk(prep, name, r)
            yield "data: [DONE]\n\n"
            done(role, reason, r, 200)
            if reason in (guard.ROUTED, guard.ROUTED_FALLBACK):
                _shadow(srv, prep, r if role == "candidate" else None, r if role == "fallback" else None)
        except asyncio.TimeoutError:
            done(role, reason, None, 504)
            yield "data: " + json.dumps(error_body("the request timed out mid-answer", "timeout")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that went away stops the generation
            getter.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=_headers(srv, role, reason))


# -- the app --------------------------------------------------------------------------------------
def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app serving config's models; models load and workers start here."""
    from contextlib import asynccontextmanager

    srv = Server(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        srv.close()

    app = FastAPI(title="lowbit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        # FastAPI's own errors (unparsable body, unknown path, wrong method) in the OpenAI error shape
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        srv.m_rejected.labels(why="bad_request").inc()
        errs = e.errors()
        parts = []
        for err in errs[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        first = ".".join(str(x) for x in errs[0].get("loc", ()) if x != "body") if errs else None
        return JSONResponse(error_body("; ".join(parts) or "malformed request", "invalid_request_error", first or None),
                            status_code=400)

    @app.middleware("http")
    async def limits(request: Request, call_next):
        n = request.headers.get("content-length")
        if n is not None and (not n.isdigit() or int(n) > MAX_BODY_BYTES):
            srv.m_rejected.labels(why="too_large").inc()
            return JSONResponse(error_body(f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error"),
                                status_code=413)
        return await call_next(request)

    def auth(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        got = got[7:] if got.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(got.encode(), key.encode()):
            srv.m_rejected.labels(why="unauthorized").inc()
            raise ApiError(401, "missing or wrong API key; fix: send `Authorization: Bearer KEY`",
                           kind="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def serve(endpoint: str, body: _Body, request: Request):
        auth(request)
        t0 = time.perf_counter()
        deadline = time.monotonic() + config.timeout_s
        prep = Prepared(srv, body, endpoint, request.headers)
        prep.ids(prep.pinned or "fallback")  # prompt checks before anything is queued

        def done(role: str, reason: str, r: GenResult | None, status: int) -> None:
            name = srv.names[role]
            srv.m_requests.labels(endpoint=endpoint, model=name, reason=reason, status=str(status)).inc()
            srv.m_latency.labels(endpoint=endpoint, model=name).observe(time.perf_counter() - t0)
            if r is not None:
                srv.m_tokens.labels(model=name).inc(len(r.token_ids))
            if srv.analysis and prep.pinned is None and status == 200:
                # the candidate was asked unless the share routed the request to the fallback
                asked = "fallback" if reason == guard.ROUTED_FALLBACK else "candidate"
                srv.analysis.observe_request(asked, time.perf_counter() - t0, reason)

        try:
            if prep.stream:
                return await _stream(srv, prep, deadline, done)
            ans = await _answer(srv, prep, deadline)
        except asyncio.TimeoutError:
            srv.m_rejected.labels(why="timeout").inc()
            raise ApiError(504, f"no answer within the request timeout ({config.timeout_s:g} s)", kind="timeout",
                           code="timeout") from None
        except ApiError:
            raise
        except Exception as e:
            log.exception("request failed")
            raise ApiError(500, f"the model failed: {type(e).__name__}: {e}", kind="server_error") from None
        done(ans.role, ans.reason, ans.result, 200)
        return JSONResponse(_body(srv, prep, ans), headers=_headers(srv, ans.role, ans.reason, ans.fallback_problem))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        return await serve("chat", body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await serve("completions", body, request)

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        ids = [config.served_name, srv.names["candidate"], srv.names["fallback"]]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": int(srv.started), "owned_by": "lowbit"}
                                           for i in ids]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        ok = srv.cand_w.alive and srv.fb_w.alive
        return JSONResponse({"ready": ok, "canary_share": srv.router.share,
                             "queue": {"candidate": srv.cand_w.depth(), "fallback": srv.fb_w.depth()}},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(srv.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    def admin(request: Request) -> None:
        if config.api_key is None:
            host = request.client.host if request.client else ""
            if host not in ("127.0.0.1", "::1", "testclient"):
                raise ApiError(403, "the admin endpoints answer only loopback clients when no API key is set; "
                                    "fix: start the server with --api-key", kind="permission_error")
        auth(request)

    def canary_state() -> dict:
        a = srv.analysis
        return {"share": srv.router.share, "history": srv.router.history[-50:],
                "analysis": None if a is None else {"rolled_back": a.rolled_back, "failing_windows": a.failures,
                                                    "decisions": a.decisions[-20:]},
                "shadow": srv.scorer.summary() if srv.scorer else None,
                "min_logprob": {"floor": srv.floor, "auto": srv.auto_floor, "calibration": srv.floor_info}}

    @app.get("/admin/canary")
    async def get_canary(request: Request):
        admin(request)
        return canary_state()

    @app.post("/admin/canary")
    async def set_canary(body: CanaryBody, request: Request):
        admin(request)
        srv.router.set_share(body.share, "admin")
        if srv.analysis:  # a share set by hand restarts the analysis from it
            srv.analysis.rolled_back, srv.analysis.failures = False, 0
        log.info("canary share set to %g%% by the admin endpoint", body.share)
        return canary_state()

    return app


def run(config: ServeConfig) -> None:
    """Load the models, start uvicorn on config.host:config.port and block until stopped."""
    import uvicorn

    config.check()
    if not log.handlers:  # canary decisions, fallbacks and warnings go to stderr beside uvicorn's access log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s lowbit.serve %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(config.log_level.upper() if config.log_level.upper() in logging.getLevelNamesMapping() else "INFO")
    if not config.loopback_only and config.api_key is None:
        log.warning("serving on %s without an API key: anyone who reaches the port can use the models", config.host)
    app = create_app(config)
    srv = app.state.server
    log.info("serving %s (candidate, %g%% of routed traffic) and %s (fallback) as '%s' on http://%s:%d/v1%s%s%s",
             srv.names["candidate"], srv.router.share, srv.names["fallback"], config.served_name, config.host,
             config.port, "; shadow scoring on" if config.shadow else "",
             f"; canary analysis with spec {config.spec}" if config.spec else "",
             "; API key required" if config.api_key else "")
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
