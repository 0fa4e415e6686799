"""FP8 (E4M3 and E5M2) with a float32 scale, using torch's float8 dtypes for the rounding."""

from __future__ import annotations

import torch

from lowbit.formats.affine import as_groups, range_scale

DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fmax(kind: str) -> float:
    return float(torch.finfo(DTYPES[kind]).max)  # 448 for E4M3, 57344 for E5M2


def choose_scale(x: torch.Tensor, spec) -> torch.Tensor:
    """Scale (rows, n_groups) so that amax maps to the format's largest finite value."""
    amax = as_groups(x.float(), spec).abs().amax(dim=-1)
    return range_scale(amax, fmax(spec.kind))


def quantize(x: torch.Tensor, scale: torch.Tensor, spec) -> torch.Tensor:
    """x / scale, saturated to the finite range, cast (round-to-nearest-even) to float8."""
    g = as_groups(x.float(), spec) / scale.float().unsqueeze(-1)  # (rows, n_groups, group_len)
    m = fmax(spec.kind)
    q = g.clamp(-m, m).to(DTYPES[spec.kind])
    return q.reshape(x.shape[0] if x.ndim > 1 else 1, -1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, spec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = as_groups(q, spec).float() * scale.float().unsqueeze(-1)
    return g.reshape(q.shape).to(dtype)
