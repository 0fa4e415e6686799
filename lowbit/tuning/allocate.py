"""Allocation: one format per module, from a measured cost table, under a size budget or a quality target.

A multiple-choice knapsack solved through its Lagrangian: for a price lam on bytes, every module
independently takes the format minimising kld + lam * bytes; lam is bisected until the size fits (or
the estimated KLD meets the target), and the bytes left over are spent greedily on the upgrades that
remove the most KLD per byte. The uniform schemes (every module in one format) are always scored too,
and the solver returns a uniform one when it estimates better, so it can never lose to them on its
own estimate; the tuner's trials then compare them measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.tuning.measure import Measurement, ModuleCost


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, str]  # module -> option key
    est_kld: float  # sum of the modules' estimated KLD
    bytes: int  # stored bytes of the whole model (fixed part included)
    params: int
    how: str  # "mix" or "uniform <key>"

    @property
    def bits(self) -> float:
        return 8 * self.bytes / max(self.params, 1)

    def key(self) -> tuple:
        return tuple(sorted(self.choice.items()))


def _alloc(meas: Measurement, choice: dict[str, str], how: str) -> Allocation:
    est = sum(m.kld[choice[m.name]] for m in meas.modules)
    size = meas.fixed_bytes + sum(m.bytes[choice[m.name]] for m in meas.modules)
    return Allocation(dict(choice), est, size, meas.params, how)


def _pick(m: ModuleCost, lam: float, allowed: set[str]) -> str:
    return min((k for k in m.kld if k in allowed), key=lambda k: (m.kld[k] + lam * m.bytes[k], m.bytes[k]))


def _at(meas: Measurement, lam: float, allowed: set[str]) -> dict[str, str]:
    return {m.name: _pick(m, lam, allowed) for m in meas.modules}


def _allowed(meas: Measurement, allowed: set[str] | None) -> set[str]:
    keys = set(allowed) if allowed is not None else {k for m in meas.modules for k in m.kld}
    for m in meas.modules:
        if not keys & set(m.kld):
            raise LowbitError(f"tune: module {m.name} can take none of the allowed formats ({', '.join(sorted(keys))})")
    return keys


def uniforms(meas: Measurement, allowed: set[str] | None = None) -> list[Allocation]:
    """Every single-format scheme (a module that cannot take the format keeps its nearest larger one)."""
    keys = _allowed(meas, allowed)
    out = []
    for k in sorted(keys):
        choice = {}
        for m in meas.modules:
            if k in m.kld:
                choice[m.name] = k
            else:  # e.g. a row length no group of this format divides: the smallest format above it
                above = [c for c in m.kld if c in keys and m.bytes[c] >= m.bytes.get(k, 0)]
                choice[m.name] = min(above or [c for c in m.kld if c in keys], key=lambda c: m.bytes[c])
        out.append(_alloc(meas, choice, f"uniform {k}"))
    return out


def smallest(meas: Measurement, allowed: set[str] | None = None) -> Allocation:
    keys = _allowed(meas, allowed)
    return _alloc(meas, {m.name: min((k for k in m.kld if k in keys), key=lambda k: m.bytes[k]) for m in meas.modules},
                  "smallest")


def _greedy_fill(meas: Measurement, choice: dict[str, str], budget: int, allowed: set[str]) -> dict[str, str]:
    """Spend the bytes left under the budget on the upgrades with the most KLD removed per byte."""
    choice = dict(choice)
    size = meas.fixed_bytes + sum(m.bytes[choice[m.name]] for m in meas.modules)
    while True:
        best, best_gain = None, 0.0
        for m in meas.modules:
            cur = choice[m.name]
            for k in m.kld:
                if k not in allowed:
                    continue
                extra, gain = m.bytes[k] - m.bytes[cur], m.kld[cur] - m.kld[k]
                if gain > 0 and size + extra <= budget:
                    rate = gain / max(extra, 1)
                    if rate > best_gain:
                        best, best_gain = (m, k, extra), rate
        if best is None:
            return choice
        m, k, extra = best
        choice[m.name], size = k, size + extra


def for_budget(meas: Measurement, budget: int, allowed: set[str] | None = None) -> Allocation:
    """The least estimated KLD whose size is at most `budget` bytes."""
    keys = _allowed(meas, allowed)
    low = smallest(meas, keys)
    if low.bytes > budget:
        raise LowbitError(f"tune: the budget ({budget / 1e6:.3g} MB, {8 * budget / meas.params:.2f} bits/weight) is below "
                          f"the smallest model the menu can make ({low.bytes / 1e6:.3g} MB, {low.bits:.2f} bits/weight, "
                          f"every module in its smallest format); fix: raise the budget or add smaller formats to --menu")
    lo, hi = 0.0, 1.0  # price per byte: lo gives the biggest (best) mix, hi a small enough one
    while _alloc(meas, _at(meas, hi, keys), "").bytes > budget:
        hi *= 4
        if hi > 1e30:
            break
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if _alloc(meas, _at(meas, mid, keys), "").bytes > budget:
            lo = mid
        else:
            hi = mid
    choice = _at(meas, hi, keys)
    if _alloc(meas, choice, "").bytes > budget:
        choice = low.choice
    mix = _alloc(meas, _greedy_fill(meas, choice, budget, keys), "mix")
    fits = [u for u in uniforms(meas, keys) if u.bytes <= budget]
    best_uniform = min(fits, key=lambda u: u.est_kld, default=None)
    if best_uniform is not None and best_uniform.est_kld < mix.est_kld:
        return best_uniform
    return mix


def for_quality(meas: Measurement, target_kld: float, allowed: set[str] | None = None) -> Allocation:
    """The smallest mix whose estimated KLD is at most `target_kld` (the best one if none reaches it)."""
    keys = _allowed(meas, allowed)
    best = _alloc(meas, _at(meas, 0.0, keys), "mix")  # every module in its least-KLD format
    if best.est_kld > target_kld:
        return best
    lo, hi = 0.0, 1.0
    while _alloc(meas, _at(meas, hi, keys), "").est_kld <= target_kld and hi < 1e30:
        hi *= 4
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if _alloc(meas, _at(meas, mid, keys), "").est_kld <= target_kld:
            lo = mid
        else:
            hi = mid
    mix = _alloc(meas, _at(meas, lo, keys), "mix")
    # fill: the bytes up to the next hull point's size cannot buy a smaller model, so keep the hull point
    fits = [u for u in uniforms(meas, keys) if u.est_kld <= target_kld]
    best_uniform = min(fits, key=lambda u: u.bytes, default=None)
    if best_uniform is not None and best_uniform.bytes < mix.bytes:
        return best_uniform
    return mix


def parse_size(text: str) -> int:
    """'90MB', '1.5GB', '123456' (bytes) -> bytes."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            num, mult = t[: -len(u)], units[u]
            break
    else:
        num, mult = t, 1
    try:
        val = float(num) * mult
    except ValueError:
        raise LowbitError(f"--max-size '{text}': not a size; fix: write it like 90MB, 1.5GB or 123456789") from None
    if not math.isfinite(val) or val <= 0:
        raise LowbitError(f"--max-size '{text}': must be a positive size, like 90MB")
    return int(val)


def parse_duration(text: str) -> float:
    """'90s', '20m', '1.5h' or a plain number of seconds -> seconds."""
    t = str(text).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    num = t[:-1] if mult else t
    try:
        val = float(num) * (mult or 1)
    except ValueError:
        raise LowbitError(f"--time-budget '{text}': not a duration; fix: write it like 90s, 20m or 1.5h") from None
    if not math.isfinite(val) or val <= 0:
        raise LowbitError(f"--time-budget '{text}': must be a positive duration, like 20m")
    return val
