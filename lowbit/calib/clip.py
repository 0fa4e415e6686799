"""Clipping search: shrink each group's range when the rounding error saved outweighs the clipping error.

Round-to-nearest maps a group's [min, max] onto the integer grid, so one outlier stretches the step for
every other weight. Trying a few shrink factors per group and keeping the one with the least error is
the cheap fix (MSE-optimal clipping). The error is measured on the weight itself, weighted per input
channel by an importance (mean x**2 from calibration) when given, or on the layer output for sample
activations (AWQ's clipping step).
"""

from __future__ import annotations

import torch

from lowbit.formats import affine
from lowbit.formats.spec import QuantSpec


def _qdq_groups(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize groups g (rows, n_groups, gs) with the range [lo, hi] (rows, n_groups)."""
    scale, zero = affine.qparams_from_range(lo, hi, spec)
    flat = g.reshape(g.shape[0], -1)
    q = affine.quantize(flat, scale, zero, spec)
    return affine.dequantize(q, scale, zero, spec).reshape(g.shape)


def clip_search(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
                x: torch.Tensor | None = None, grid: int = 20, min_shrink: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (as affine.choose_qparams returns them) with the best shrink per group.

    w: (out, in). importance: (in,) weights for the squared error per input channel. x: (tokens, in)
    sample activations; the error is then that of each group's partial dot products with x.
    Shrink factors run from 1.0 (plain RTN, always a candidate) down to min_shrink.
    """
    g = affine.as_groups(w.float(), spec)  # (rows, n_groups, gs)
    rows, n_groups, gs = g.shape
    lo0, hi0 = g.amin(-1), g.amax(-1)  # (rows, n_groups)
    if x is not None:
        xg = x.float().reshape(x.shape[0], n_groups, gs) if spec.granularity != "tensor" else None
    if importance is not None:
        imp = importance.float().reshape(-1)
        imp_g = (imp.reshape(n_groups, gs) if spec.granularity != "tensor" else imp.repeat(rows).reshape(1, 1, -1))
    best_err = torch.full((rows, n_groups), float("inf"), device=w.device)
    best_f = torch.ones(rows, n_groups, device=w.device)
    for i in range(grid + 1):
        f = 1.0 - (1.0 - min_shrink) * i / grid
        d = _qdq_groups(g, lo0 * f, hi0 * f, spec) - g  # (rows, n_groups, gs)
        if x is not None and xg is not None:
            err = torch.einsum("rgk,tgk->rgt", d, xg).pow(2).mean(-1)  # (rows, n_groups)
        elif importance is not None:
            err = (d.pow(2) * imp_g).sum(-1)
        else:
            err = d.pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    return affine.qparams_from_range(lo0 * best_f, hi0 * best_f, spec)
