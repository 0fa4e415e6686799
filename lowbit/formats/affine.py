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


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """choose_qparams from each group's min and max (any shape); clipping searches shrink the range."""
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return _store_scale(scale, spec), None
    if spec.zero_domain == "float":
        span = hi - lo
        scale = _store_scale(torch.where(span > 0, span / qmax, torch.ones_like(span)), spec)
        return scale, lo.to(torch_dtype(spec.scale_dtype))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    scale = _store_scale(torch.where(span > 0, span / qmax, torch.ones_like(span)), spec)
    zero = torch.clamp(torch.round(-lo / scale.float()), qmin, qmax).to(torch.uint8)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integer codes with x's 2-D shape: int8 if symmetric, uint8 (0..2**b-1) otherwise."""
    g = as_groups(x.float(), spec)  # (rows, n_groups, group_len)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    if zero_point is not None and zero_point.is_floating_point():  # float zero domain: an offset
        q = torch.round((g - zero_point.float().unsqueeze(-1)) / scale.float().unsqueeze(-1))
    else:
        q = torch.round(g / scale.float().unsqueeze(-1))
    if zero_point is not None and not zero_point.is_floating_point():
        q = q + zero_point.float().unsqueeze(-1)
    q = q.clamp(qmin, qmax).to(torch.int8 if spec.symmetric else torch.uint8)
    return q.reshape(x.shape if x.ndim == 2 else (1, -1) if x.ndim == 1 else (x.shape[0], -1))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize: s * (q - z), returned with q's 2-D shape in `dtype`."""
    g = as_groups(q, spec).float()  # (rows, n_groups, group_len)
    if zero_point is not None and zero_point.is_floating_point():
        return (g * scale.float().unsqueeze(-1) + zero_point.float().unsqueeze(-1)).reshape(q.shape).to(dtype)
    if zero_point is not None:
        g = g - zero_point.float().unsqueeze(-1)
    return (g * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)
