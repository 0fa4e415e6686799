"""Affine integer quantization: the one place integer rounding lives.

    q     = clamp(round(x / s) + z, qmin, qmax)
    x_hat = s * (q - z)

Symmetric: z = 0, s = amax / qmax, q in [-2**(b-1), 2**(b-1) - 1] (stored as int8).
Asymmetric: the range [min(x, 0), max(x, 0)] maps onto [0, 2**b - 1], z is an integer in that
range (stored as uint8), q is unsigned.
Asymmetric, float zero domain: the range [min(x), max(x)] maps onto [0, 2**b - 1] and the offset
m = min(x) is stored as a float (scale_dtype):  q = clamp(round((x - m) / s)),  x_hat = s * q + m.

Scales and zero points have shape (rows, n_groups): rows = 1 for per-tensor, the output rows
otherwise; n_groups = 1 except for group-wise.

The rule itself is written once, in `round_to_grid` (value -> code) and `grid_values` (code ->
value). Everything else that rounds to integers uses them: `quantize` / `dequantize` here, GPTQ's
column loop, and, through `quantize_symmetric_int8`, int8 activations, the int8 KV cache and NF4's
double-quantized scales. torch.round rounds halves to even, so every caller breaks ties the same way.
"""

from __future__ import annotations

import torch

from lowbit.formats.spec import QuantSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def as_groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x as (rows, n_groups, group_len) for the spec's granularity. 1-D x is one row."""
    x2 = x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)  # (rows, cols)
    rows, cols = x2.shape
    if spec.granularity == "tensor":
        return x2.reshape(1, 1, rows * cols)
    if spec.granularity == "channel":
        return x2.reshape(rows, 1, cols)
    gs = spec.group_size
    if cols % gs:
        raise ValueError(f"group_size {gs} does not divide the row length {cols}")
    return x2.reshape(rows, cols // gs, gs)  # (rows, cols // gs, gs)


def _store_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Cast scales to their storage dtype, keeping them positive and finite in it."""
    dt = torch_dtype(spec.scale_dtype)
    info = torch.finfo(dt)
    tiny = info.smallest_normal if dt == torch.bfloat16 else 2.0**-24 if dt == torch.float16 else info.tiny
    return scale.clamp(min=tiny, max=info.max).to(dt)


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rows, n_groups) in spec.scale_dtype and zero point: None if symmetric, uint8 for the
    int zero domain, the float offset (scale_dtype) for the float zero domain."""
    g = as_groups(x.float(), spec)  # (rows, n_groups, group_len)
    return qparams_from_range(g.amin(dim=-1), g.amax(dim=-1), spec)


def range_scale(span: torch.Tensor, qmax: float) -> torch.Tensor:
    """The step that maps a range (amax, or max - min) onto qmax steps; 1 where the range is empty, so
    an all-zero group gets a usable scale (its codes are zero either way)."""
    return torch.where(span > 0, span / qmax, torch.ones_like(span))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """choose_qparams from each group's min and max (any shape); clipping searches shrink the range."""
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = range_scale(amax, qmax)
        return _store_scale(scale, spec), None
    if spec.zero_domain == "float":
        span = hi - lo
        scale = _store_scale(range_scale(span, qmax), spec)
        return scale, lo.to(torch_dtype(spec.scale_dtype))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    scale = _store_scale(range_scale(span, qmax), spec)
    zero = round_to_grid(-lo, scale.float(), qmin, qmax).to(torch.uint8)
    return scale, zero


def round_to_grid(x: torch.Tensor, scale: torch.Tensor | float, qmin: int, qmax: int, *,
                  zero: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes of x on the grid `scale`, as floats:  clamp(round((x - offset) / scale) + zero, qmin, qmax).

    `offset` is the float zero domain (subtracted before the division, so the grid starts exactly at
    it); `zero` is the integer zero point (added after rounding, so it moves the codes, not the grid).
    Formats use at most one of them; symmetric ones neither. Ties round half to even (torch.round).

    The codes come back in floating point (x's dtype promoted with scale's) because the callers
    differ in what they need next: an integer storage dtype, or (GPTQ) the dequantized value and the
    rounding error. scale, zero and offset broadcast to x's shape, which the codes keep.

    Only the first operation allocates; the rest work in place on that fresh tensor, so x is never
    written and a caller rounding one column at a time pays for one temporary per call."""
    q = torch.div(x, scale) if offset is None else torch.sub(x, offset).div_(scale)
    q.round_()
    if zero is not None:
        q.add_(zero)
    return q.clamp_(qmin, qmax)


def grid_values(q: torch.Tensor, scale: torch.Tensor | float, *, zero: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """The values float codes q stand for, the inverse of `round_to_grid`:  scale * (q - zero) + offset.

    zero and offset mean what they mean in `round_to_grid` and broadcast to q's shape. Like it, only
    the first operation allocates, which is why q must already be floating point."""
    v = torch.mul(q, scale) if zero is None else torch.sub(q, zero).mul_(scale)
    return v if offset is None else v.add_(offset)


INT8_SYMMETRIC_MAX = 127


def quantize_symmetric_int8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """int8 codes round(x / scale) clamped to [-127, 127]: activations, the KV cache, NF4's scales.

    The range stops at -127, not -128, so the grid is symmetric: -x gets exactly the negated code,
    and a value clipped by a fixed (calibrated) scale lands on +-127 whichever side it is on. (The
    int8 weights of `quantize` keep qrange's [-128, 127], the stored format's range.) Dequantize
    with codes.float() * scale."""
    return round_to_grid(x, scale, -INT8_SYMMETRIC_MAX, INT8_SYMMETRIC_MAX).to(torch.int8)


def _group_params(scale: torch.Tensor, zero_point: torch.Tensor | None):
    """(scale, int zero point or None, float offset or None) as float32, shaped to broadcast over
    as_groups' (rows, n_groups, group_len)."""
    s = scale.float().unsqueeze(-1)
    if zero_point is None:
        return s, None, None
    if zero_point.is_floating_point():  # float zero domain: an offset
        return s, None, zero_point.float().unsqueeze(-1)
    return s, zero_point.float().unsqueeze(-1), None


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integer codes with x's 2-D shape: int8 if symmetric, uint8 (0..2**b-1) otherwise."""
    g = as_groups(x.float(), spec)  # (rows, n_groups, group_len)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    s, z, m = _group_params(scale, zero_point)
    q = round_to_grid(g, s, qmin, qmax, zero=z, offset=m).to(torch.int8 if spec.symmetric else torch.uint8)
    return q.reshape(x.shape if x.ndim == 2 else (1, -1) if x.ndim == 1 else (x.shape[0], -1))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize: s * (q - z), returned with q's 2-D shape in `dtype`."""
    g = as_groups(q, spec).float()  # (rows, n_groups, group_len)
    s, z, m = _group_params(scale, zero_point)
    return grid_values(g, s, zero=z, offset=m).reshape(q.shape).to(dtype)
