"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling their input
channels up before rounding (and the activations down by the same factor, folded into the op that
feeds them), with the per-channel scale s = mean|x|^a / mean|w|^(1-a) and a picked from a grid by the
output error it leaves; then a clipping search on the scaled weights.
"""

from __future__ import annotations

import torch

from lowbit.formats.qtensor import qdq
from lowbit.formats.spec import QuantSpec


def weight_magnitude(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's max |w|, per input channel: (in,)."""
    rows = []
    for w in weights:
        a = w.abs().float()
        gs = spec.group_size if spec.granularity == "group" else a.shape[1]
        g = a.reshape(a.shape[0], -1, gs)  # (out, n_groups, gs)
        rows.append((g / g.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(a.shape))
    return torch.cat(rows).mean(0)


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], specs: list[QuantSpec], grid: int = 20
                  ) -> tuple[torch.Tensor, float, float]:
    """The input-channel scale (in,) that minimises the summed output error of `weights` on x (tokens, in).

    Returns (scale, best ratio a, error at a = 0 relative to the error without scaling). a = 0 (s = 1)
    is on the grid, so the result is never worse than plain rounding on these samples.
    """
    x = x.float()
    x_mag = x.abs().mean(0)  # (in,)
    w_mag = weight_magnitude(weights, specs[0])
    refs = [x @ w.float().t() for w in weights]  # (tokens, out_k)
    best = (torch.ones_like(x_mag), 0.0, float("inf"))
    base_err = None
    for i in range(grid):
        a = i / grid
        s = (x_mag.pow(a) / w_mag.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        err = 0.0
        for w, spec, ref in zip(weights, specs, refs):
            wq = qdq(w.float() * s, spec) / s  # what the block computes after folding
            err += (x @ wq.t() - ref).pow(2).mean().item()
        if base_err is None:
            base_err = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], best[2] / base_err if base_err else 1.0
