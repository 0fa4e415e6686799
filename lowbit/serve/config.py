"""ServeConfig: everything `lowbit serve` is told, checked once before any model loads."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# the `lowbit serve` option of each field whose name differs from it (errors name the option to change)
OPTION = {"timeout_s": "--timeout", "candidate_timeout_s": "--candidate-timeout", "step_pct": "--step",
          "min_mean_logprob": "--min-logprob", "shadow_queue_size": "--shadow-queue-size"}


@dataclass
class ServeConfig:
    # what to serve: a path / bundled name (loaded with lowbit.load), a lowbit.Model, or an
    # engine.Backend (tests wrap models in backends that misbehave on purpose)
    candidate: Any
    fallback: Any
    canary: float = 10.0  # percent of routed traffic the candidate answers
    shadow: bool = False  # replay each answered request to the other model and score the pair
    spec: str | None = None  # gate spec: automated canary analysis over shadow scores
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, every /v1 and /admin call needs `Authorization: Bearer KEY`
    served_name: str = "lowbit"  # the model id that is routed (candidate or fallback)
    candidate_name: str | None = None  # ids to pin one model; default: the folder / model name
    fallback_name: str | None = None
    queue_size: int = 16  # client requests waiting per model; beyond it: 429 with Retry-After
    max_batch: int = 8  # client requests a model decodes together (the lean loop's batch); 1: one at a time
    threads: int | None = None  # torch / native threads per model worker; None: half the CPUs (at least 1)
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128
    timeout_s: float = 120.0  # a whole request; past it: 504
    candidate_timeout_s: float = 30.0  # the candidate's answer; past it the fallback answers
    # below it the candidate's answer counts as low-confidence; "auto": calibrated from shadow pairs
    min_mean_logprob: float | str | None = None
    floor_pairs: int = 50  # "auto": shadow pairs before the first calibration, and between recalibrations
    floor_false_pct: float = 2.0  # "auto": the share of good answers the floor may send to the fallback
    repetition_penalty: float = 1.1  # as `lowbit generate` (small models loop without it)
    shadow_queue_size: int = 8  # pairs waiting to be scored; beyond it new pairs are dropped
    shadow_max_tokens: int = 64  # at most this many tokens per shadow replay
    record_every: int = 50  # shadow pairs between run-registry records (and one at shutdown)
    registry_db: Path | None = None  # None: the default run registry (LOWBIT_HOME or the cache)
    # canary analysis (--spec): judged every `window` shadow pairs
    window: int = 20
    step_pct: float = 10.0
    max_canary: float = 100.0
    max_failures: int = 2
    log_level: str = "info"
    extra: dict = field(default_factory=dict)

    def check(self) -> "ServeConfig":
        """Every field's type and range, with the option to change named."""
        def number(name: str, lo: float, hi: float | None = None, integer: bool = False, low_open: bool = False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            opt = OPTION.get(name, "--" + name.replace("_", "-"))
            if isinstance(v, bool) or not ok or not math.isfinite(v) or (v <= lo if low_open else v < lo) \
                    or (hi is not None and v > hi):
                rng = f"{'above' if low_open else 'at least'} {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")
                raise LowbitError(f"serve {opt}: {v!r} is out of range; fix: give a "
                                  f"{'whole number' if integer else 'number'} {rng}")

        number("canary", 0, 100)
        number("port", 0, 65535, integer=True)
        number("queue_size", 1, 100_000, integer=True)
        number("max_batch", 1, 64, integer=True)
        if self.threads is not None:
            number("threads", 1, 1024, integer=True)
        number("max_prompt_tokens", 1, 1_048_576, integer=True)
        number("max_tokens_limit", 1, 16384, integer=True)
        number("default_max_tokens", 1, self.max_tokens_limit, integer=True)
        number("timeout_s", 0, 86400, low_open=True)
        number("candidate_timeout_s", 0, 86400, low_open=True)
        number("repetition_penalty", 0, 10, low_open=True)
        number("shadow_queue_size", 1, 10_000, integer=True)
        number("shadow_max_tokens", 1, 4096, integer=True)
        number("record_every", 1, 1_000_000, integer=True)
        number("window", 1, 100_000, integer=True)
        number("step_pct", 0, 100, low_open=True)
        number("max_canary", 0, 100)
        number("max_failures", 1, 1000, integer=True)
        if self.min_mean_logprob == "auto":
            if not self.shadow:
                raise LowbitError("serve --min-logprob auto: the floor is calibrated from shadow pairs; "
                                  "fix: add --shadow, or give a number such as -2.5")
        elif self.min_mean_logprob is not None:
            number("min_mean_logprob", -1000, 0)
        number("floor_pairs", 1, 1_000_000, integer=True)
        number("floor_false_pct", 0, 50)
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 8):
            raise LowbitError("serve --api-key: use at least 8 characters (or leave it out for no key)")
        for name in ("served_name", "candidate_name", "fallback_name"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip() or len(v) > 200):
                raise LowbitError(f"serve {name}: {v!r} is not a usable model id; fix: give 1-200 characters")
        if self.spec is not None and self.canary > self.max_canary:
            raise LowbitError(f"serve --canary {self.canary:g} is above --max-canary {self.max_canary:g}")
        return self

    @property
    def loopback_only(self) -> bool:
        if self.host in LOOPBACK:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
