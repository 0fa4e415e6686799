"""Fixtures for the server tests: tiny models (random Llama + byte tokenizer) and backends that
misbehave on purpose (broken JSON, errors, stalls), wrapped in lowbit serve's Backend."""

from __future__ import annotations

import threading
import time

import pytest

from lowbit.serve.engine import Backend, Cancelled, GenParams, GenResult
from tests.conftest import make_tiny_llama, make_tokenizer


def tiny_model(seed: int = 0):
    from lowbit.model.handle import as_model

    return as_model(make_tiny_llama(seed), make_tokenizer())


class Scripted(Backend):
    """A real tiny model whose answers are replaced by a fixed text (tokenized by its own tokenizer):
    the real tiny models write random bytes, never JSON."""

    def __init__(self, text: str, name: str, logprob: float = -0.1, delay_s: float = 0.0) -> None:
        super().__init__(tiny_model(), name)
        self.text, self.logprob, self.delay_s = text, logprob, delay_s
        self.calls = 0

    def generate(self, prompt_ids, params: GenParams, on_text=None, should_stop=lambda: False) -> GenResult:
        self.calls += 1
        ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"][: params.max_tokens]
        text = self.decode(ids)
        for i in range(len(ids)):
            if self.delay_s:
                time.sleep(self.delay_s)
            if should_stop():
                raise Cancelled()
            if on_text:
                on_text(self.decode(ids[: i + 1])[len(self.decode(ids[:i])):])
        return GenResult(text, list(ids), [self.logprob] * len(ids), "stop", len(prompt_ids), 0.0)


class Raising(Backend):
    def __init__(self, name: str = "raiser") -> None:
        super().__init__(tiny_model(), name)
        self.calls = 0

    def generate(self, *a, **k):
        self.calls += 1
        raise RuntimeError("injected candidate fault")


class Blocking(Backend):
    """generate waits until `release` is set (or it is cancelled): holds its worker busy."""

    def __init__(self, name: str = "blocker") -> None:
        super().__init__(tiny_model(), name)
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, prompt_ids, params, on_text=None, should_stop=lambda: False):
        self.started.set()
        while not self.release.wait(0.01):
            if should_stop():
                raise Cancelled()
        return GenResult("done", [100], [-0.1], "stop", len(prompt_ids), 0.0)


@pytest.fixture()
def registry_db(tmp_path):
    return tmp_path / "runs.sqlite"


class BreaksMidway(Scripted):
    """Streams its first `after` tokens, then raises (mode "raise") or stalls until cancelled ("stall")."""

    def __init__(self, text: str, name: str, after: int, mode: str = "raise") -> None:
        super().__init__(text, name)
        self.after, self.mode = after, mode

    def generate(self, prompt_ids, params, on_text=None, should_stop=lambda: False):
        ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"]
        for i in range(self.after):
            if on_text:
                on_text(self.decode(ids[: i + 1])[len(self.decode(ids[:i])):])
        if self.mode == "raise":
            raise RuntimeError("injected fault mid-answer")
        while not should_stop():
            time.sleep(0.01)
        raise Cancelled()


class Recording(Scripted):
    """A Scripted model that keeps the prompt ids and max_tokens of every call."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text, name)
        self.seen: list[tuple[list[int], int]] = []

    def generate(self, prompt_ids, params, on_text=None, should_stop=lambda: False):
        self.seen.append((list(prompt_ids), params.max_tokens))
        return super().generate(prompt_ids, params, on_text, should_stop)
