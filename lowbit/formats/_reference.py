"""Slow, obvious oracles for the tests: element by element, plain Python arithmetic."""

from __future__ import annotations

import math


def affine_quantize_list(xs: list[float], bits: int, symmetric: bool) -> tuple[float, int, list[int]]:
    """Per-tensor affine quantization of a list: (scale, zero_point, codes)."""
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = max(abs(v) for v in xs)
        scale = amax / qmax if amax > 0 else 1.0
        zero = 0
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = min(min(xs), 0.0), max(max(xs), 0.0)
        scale = (hi - lo) / qmax if hi > lo else 1.0
        zero = min(max(_round_half_even(-lo / scale), qmin), qmax)
    codes = [min(max(_round_half_even(v / scale) + zero, qmin), qmax) for v in xs]
    return scale, zero, codes


def _round_half_even(v: float) -> int:
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 == 1):
        return int(f + 1)
    return int(f)


def pack_list(values: list[int], bits: int) -> list[int]:
    """Little-endian bit stream of `bits`-wide values, padded to a whole byte."""
    acc, nbits, out = 0, 0, []
    for v in values:
        acc |= v << nbits
        nbits += bits
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    return out
