"""Canary routing: which model answers a request.

A request with a sticky key (the OpenAI `user` field, or an `x-conversation-id` header) is hashed to a
fixed point in [0, 100); it goes to the candidate when that point is under the canary share. So one
user keeps one model while the share holds, and raising the share only moves users from the fallback
to the candidate, never back. Requests without a key draw a random point each time.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time


def bucket(key: str) -> float:
    """A stable point in [0, 100) for a key (the same in every process: no Python hash seed)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 * 100


class Router:
    def __init__(self, share: float, seed: int | None = None) -> None:
        self._share = float(share)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.history: list[dict] = [{"time": time.time(), "share": self._share, "why": "start"}]

    @property
    def share(self) -> float:
        return self._share

    def set_share(self, share: float, why: str) -> None:
        with self._lock:
            self._share = float(share)
            self.history = (self.history + [{"time": time.time(), "share": self._share, "why": why}])[-1000:]

    def to_candidate(self, key: str | None) -> bool:
        with self._lock:
            point = bucket(key) if key else self._rng.random() * 100
            return point < self._share
