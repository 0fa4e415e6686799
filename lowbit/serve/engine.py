"""Model workers: one thread per model, a bounded queue of client jobs, and shadow work on the side.

A model's weights are read once per decode step whatever the request, and on a CPU two decode loops
on one model only fight for the same cores, so each model gets one thread that runs one job at a time:
one generation, or (max_batch > 1) the generations waiting in its queue decoded together as one
left-padded batch of the lean loop (static: a request arriving mid-batch waits for the next one).
Client jobs always go first; shadow jobs run only while no client job waits, and a running shadow job
gives way (it is dropped) as soon as a client job arrives, so shadowing never queues a client behind it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError


class QueueFull(Exception):
    """The model's client queue is at its limit; the caller answers 429."""


class Cancelled(Exception):
    """The job was cancelled (client gone, timed out, or shadow work giving way)."""


@dataclass
class GenParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.1
    top_logprobs: int = 0  # alternatives per token to report (0: none)


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # the model's log-probability (temperature 1) of each generated token
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    seconds: float
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


class Backend:
    """A model as the server uses it: prompts to ids, generation with log-probs, teacher forcing."""

    def __init__(self, model, name: str | None = None) -> None:
        from lowbit.model.handle import as_model
        from lowbit.runtime.generate import context_length, eos_ids

        self.handle = as_model(model)
        self.module = self.handle.module
        self.tokenizer = self.handle.need_tokenizer("serve")
        self.name = name or self.handle.name
        self.context = context_length(getattr(self.module, "config", None))
        self.eos = eos_ids(self.module, self.tokenizer)
        self.kv_cache = self.handle.kv_cache

    # -- prompts ------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(ids["input_ids"])
        # no template (a bare test model): a plain transcript ending where the assistant speaks
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_text(text)

    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that continues an answer already begun (no special tokens in front)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation ---------------------------------------------------------------------------------
    def batchable(self) -> bool:
        """Whether several prompts can decode together (the lean loop's left-padded batch). A subclass
        that replaces generate() (a test double, a fault injector) is run one request at a time, so
        its generate() is what runs."""
        from lowbit.runtime.decode import supports

        return type(self).generate is Backend.generate and supports(self.module)[0]

    def _stepper(self, ids: torch.Tensor, mask: torch.Tensor | None, max_new: int):
        """(first logits, step function, decoder): the lean loop where the architecture allows, else
        transformers' forward with its cache (one sequence)."""
        from lowbit.runtime.decode import LeanDecoder, supports

        if supports(self.module)[0]:
            dec = LeanDecoder(self.module, ids.shape[0], ids.shape[1] + max_new, self.kv_cache)
            return dec.prefill(ids, mask), dec.step, dec
        out = self.module(input_ids=ids, use_cache=True)
        state = {"past": out.past_key_values}

        def step(nxt: torch.Tensor) -> torch.Tensor:
            o = self.module(input_ids=nxt, past_key_values=state["past"], use_cache=True)
            state["past"] = o.past_key_values
            return o.logits[:, -1].float()

        return out.logits[:, -1].float(), step, None

    def generate(self, prompt_ids: list[int], params: GenParams, on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> GenResult:
        out = self.generate_batch([(prompt_ids, params, on_text, should_stop)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    @torch.no_grad()
    def generate_batch(self, items: list[tuple]) -> list[GenResult | BaseException]:
        """Several requests decoded together: items of (prompt ids, GenParams, on_text, should_stop).
        Each row keeps its own sampling, seed, stop strings and length; a finished or cancelled row
        rides along on its end token. One row's cancellation is its own result (Cancelled); a model
        error is every row's."""
        from lowbit.runtime.decode import decoding, supports

        if len(items) > 1 and not supports(self.module)[0]:  # transformers' path here decodes one sequence
            return [self.generate_batch([item])[0] for item in items]
        t0 = time.perf_counter()
        rows = [_Row(self, *item) for item in items]
        width = max(len(r.prompt) for r in rows)
        pad = self.eos[0] if self.eos else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        max_new = max(r.params.max_tokens for r in rows)
        try:
            logits, step, dec = self._stepper(ids, None if bool(mask.all()) else mask, max_new)
            guard = decoding(dec) if dec is not None else None
            if guard:
                guard.__enter__()
            try:
                for _ in range(max_new):
                    nxt = torch.full((len(rows), 1), pad, dtype=torch.long)
                    for i, r in enumerate(rows):
                        if not r.done:
                            nxt[i, 0] = r.take(logits[i : i + 1])
                    if all(r.done for r in rows):
                        break
                    logits = step(nxt)
            finally:
                if guard:
                    guard.__exit__(None, None, None)
        except Exception as e:
            return [r.error or e for r in rows]
        seconds = time.perf_counter() - t0
        return [r.error or r.result(seconds) for r in rows]

    @torch.no_grad()
    def answer_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
        """Teacher forcing: (len(answer), vocab) log-probabilities the model gives each answer position."""
        ids = torch.tensor([prompt_ids + answer_ids], dtype=torch.long)
        a = len(answer_ids)
        # only the positions that predict the answer: a 4k-token prompt's full logits would be ~800 MB
        logits = self.module(input_ids=ids, logits_to_keep=a + 1).logits[0].float()
        return torch.log_softmax(logits[-(a + 1):-1], dim=-1)


class _Row:
    """One request inside a decode loop: sampling, log-probs, stop strings, streaming of its text."""

    def __init__(self, backend: Backend, prompt: list[int], params: GenParams, on_text=None,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.b, self.prompt, self.params, self.on_text, self.should_stop = backend, prompt, params, on_text, should_stop
        self.gen = None
        if params.temperature > 0:  # a generator per request: a seed repeats an answer whatever else runs
            self.gen = torch.Generator()
            if params.seed is not None:
                self.gen.manual_seed(params.seed)
            else:
                self.gen.seed()
        self.seen = torch.tensor([prompt], dtype=torch.long)
        self.new: list[int] = []
        self.lps: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.text, self.sent, self.finish = "", 0, "length"
        # text is held back while it could still be the start of a stop string
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.done = False
        self.error: BaseException | None = None

    def take(self, logits: torch.Tensor) -> int:
        """Choose this row's next token from its (1, vocab) logits; sets done when it finishes."""
        from lowbit.runtime.decode import pick_next

        p = self.params
        if self.should_stop():
            self.done, self.error = True, Cancelled()
            return self.b.eos[0] if self.b.eos else 0
        logp = torch.log_softmax(logits.float(), dim=-1)
        nxt = pick_next(logits, self.seen if p.repetition_penalty != 1.0 else None, p.temperature, p.top_p,
                        p.repetition_penalty, self.gen)
        t = int(nxt[0, 0])
        if t in self.b.eos:
            self.done, self.finish = True, "stop"
            self._flush()
            return t
        self.new.append(t)
        self.lps.append(float(logp[0, t]))
        if p.top_logprobs:
            v, ix = logp[0].topk(p.top_logprobs)
            self.tops.append(list(zip(ix.tolist(), v.tolist())))
        if p.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, nxt], dim=1)
        self.text = self.b.decode(self.new)
        cut = min((self.text.find(s) for s in p.stop if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.finish, self.done = self.text[:cut], "stop", True
        elif len(self.new) >= p.max_tokens:
            self.done = True
        if self.done:
            self._flush()
        elif self.on_text and not self.text.endswith("\ufffd"):
            upto = max(self.sent, len(self.text) - self.hold)
            if upto > self.sent:
                self.on_text(self.text[self.sent:upto])
                self.sent = upto
        return t

    def _flush(self) -> None:
        if self.on_text and len(self.text) > self.sent:
            self.on_text(self.text[self.sent:])
            self.sent = len(self.text)

    def result(self, seconds: float) -> GenResult:
        return GenResult(self.text, self.new, self.lps, self.finish, len(self.prompt), seconds, self.tops)


def load_backend(what: Any, name: str | None = None) -> Backend:
    """A Backend from a path / bundled name (lowbit.load), a lowbit.Model or nn.Module, or a Backend."""
    if isinstance(what, Backend):
        if name:
            what.name = name
        return what
    if isinstance(what, (str, Path)):
        from lowbit.api import load

        model = load(what)
        return Backend(model, name or Path(str(what)).name)
    return Backend(what, name)


@dataclass
class Job:
    fn: Callable[[Backend, Callable[[], bool]], Any]  # run on the worker thread with the backend
    future: Future
    shadow: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    gen: tuple | None = None  # (prompt ids, GenParams, on_text) of a generation: it may join a batch


class ModelWorker:
    """One thread running jobs on one backend: client jobs from a bounded queue first, then shadow jobs."""

    def __init__(self, backend: Backend, queue_size: int, shadow_queue_size: int = 8, max_batch: int = 1,
                 threads: int | None = None) -> None:
        self.backend = backend
        self.threads = threads
        self.max_batch = max_batch if backend.batchable() else 1
        self.stash: list[Job] = []  # a job taken from the queue while filling a batch it could not join
        self.clients: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.shadows: queue.Queue[Job] = queue.Queue(maxsize=shadow_queue_size)
        self.wake = threading.Condition()
        self.running = 0  # client jobs running now (a batch counts each)
        self.stopping = False
        self.recent_s: list[float] = []  # the last job durations: Retry-After is estimated from them
        self.thread = threading.Thread(target=self._loop, name=f"lowbit-serve-{backend.name}", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def depth(self) -> int:
        return self.clients.qsize() + len(self.stash) + self.running

    def retry_after_s(self) -> int:
        avg = sum(self.recent_s) / len(self.recent_s) if self.recent_s else 1.0
        return max(1, math.ceil(avg * (self.clients.qsize() + 1)))

    def submit_generate(self, prompt_ids: list[int], params: GenParams, on_text=None) -> Job:
        """A client generation (may be batched with others waiting); raises QueueFull."""
        job = Job(lambda b, stop: b.generate(prompt_ids, params, on_text, stop), Future(),
                  gen=(prompt_ids, params, on_text))
        return self._put(job)

    def submit(self, fn, shadow: bool = False) -> Job:
        return self._put(Job(fn, Future(), shadow))

    def _put(self, job: Job) -> Job:
        shadow = job.shadow
        try:
            (self.shadows if shadow else self.clients).put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        with self.wake:
            self.wake.notify()
        return job

    def _next(self) -> Job | None:
        with self.wake:
            while not self.stopping:
                if self.stash:
                    return self.stash.pop()
                for q in (self.clients, self.shadows):
                    try:
                        return q.get_nowait()
                    except queue.Empty:
                        pass
                self.wake.wait(0.5)
        return None

    def _batch(self, first: Job) -> list[Job]:
        """first plus the client generations waiting behind it, up to max_batch."""
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self.clients.get_nowait()
            except queue.Empty:
                break
            if job.gen is None:
                self.stash.append(job)
                break
            batch.append(job)
        return [j for j in batch if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel()]

    def _run_batch(self, batch: list[Job]) -> None:
        self.running = len(batch)
        t0 = time.perf_counter()
        try:
            items = [(*j.gen[:2], j.gen[2], j.cancelled.is_set) for j in batch]
            try:
                outs = self.backend.generate_batch(items)
            except BaseException as e:
                outs = [e] * len(batch)
            for j, out in zip(batch, outs):
                if isinstance(out, BaseException):
                    j.future.set_exception(out)
                else:
                    j.future.set_result(out)
        finally:
            self.running = 0
            self.recent_s = (self.recent_s + [(time.perf_counter() - t0) / len(batch)])[-20:]

    def _loop(self) -> None:
        if self.threads:
            # torch's thread count (OpenMP's) belongs to the thread that sets it, so each worker sets its
            # own; lowbit's native kernels read it too (native.threads()). On 2 cores under 32 clients,
            # one thread per model served twice as fast as two: the event loop needs a core as well.
            torch.set_num_threads(self.threads)
        while True:
            job = self._next()
            if job is None:
                return
            if job.gen is not None and self.max_batch > 1 and not job.shadow:
                batch = self._batch(job)
                if batch:
                    self._run_batch(batch)
                continue
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                continue
            # shadow work gives way to any waiting client
            stop = (lambda: job.cancelled.is_set() or not self.clients.empty()) if job.shadow \
                else job.cancelled.is_set
            self.running = 0 if job.shadow else 1
            t0 = time.perf_counter()
            try:
                job.future.set_result(job.fn(self.backend, stop))
            except BaseException as e:  # the job's error belongs to its caller; the worker carries on
                job.future.set_exception(e)
            finally:
                self.running = 0
                if not job.shadow:
                    self.recent_s = (self.recent_s + [time.perf_counter() - t0])[-20:]

    def close(self) -> None:
        self.stopping = True
        with self.wake:
            self.wake.notify_all()
        for q in (self.clients, self.shadows):
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if not job.future.done():
                    job.future.set_exception(LowbitError("the server is shutting down"))
        self.thread.join(timeout=5)
