"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

Per input channel j, s_j = max|x_j|^alpha / max|w_j|^(1 - alpha); activations are divided by s (folded
into the op that feeds them) and weights multiplied by it. alpha = 0.5 splits the difficulty evenly.
"""

from __future__ import annotations

import torch


def smooth_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """s (in,) from the per-channel activation max |x| (in,) and the weights that read those channels."""
    w_absmax = torch.cat([w.abs().float() for w in weights]).amax(0).clamp(min=1e-5)  # (in,)
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-5)
