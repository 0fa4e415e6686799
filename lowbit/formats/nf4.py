"""NF4 (QLoRA's 4-bit NormalFloat) with optional double quantization of the absmax scales.

The 16 code values are quantiles of a standard normal, rescaled to [-1, 1], with an exact zero:
8 non-negative values from the quantiles of [0.5, offset] and 7 negative ones from the mirror.
Each group of `group_size` weights is divided by its absmax and mapped to the nearest code.
Double quantization (QLoRA sec. 3) stores the absmax scales as int8 around their mean, in blocks of
256 with one fp32 scale each: about 0.127 bits per weight of scale overhead at group 64, against 0.5.
"""

from __future__ import annotations

import torch

from lowbit.formats.affine import as_groups, quantize_symmetric_int8, range_scale
from lowbit.formats.spec import QuantSpec

# QLoRA's offset: the quantile range is [1 - offset, offset] with offset = 1/2 (1/(2*15) + 1/(2*16))...
# rounded as published. The code table below is built from it, not typed in.
_OFFSET = 0.9677083
DQ_BLOCK = 256


def code_table() -> torch.Tensor:
    """The 16 NF4 values, ascending, built from normal quantiles (float32)."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive quantiles
    neg = -ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative ones
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    v = v / v.abs().max()
    return torch.sort(v).values.to(torch.float32)


CODE = code_table()
_MIDPOINTS = (CODE[1:] + CODE[:-1]) / 2


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (any shape) -> (int8 codes (n_blocks, 256), fp32 scale per block, fp32 mean)."""
    flat = absmax.float().reshape(-1)
    mean = flat.mean()
    centered = flat - mean
    pad = (-flat.numel()) % DQ_BLOCK
    centered = torch.nn.functional.pad(centered, (0, pad)).reshape(-1, DQ_BLOCK)  # (n_blocks, 256)
    amax = centered.abs().amax(dim=-1)
    scale = range_scale(amax, 127)
    q = quantize_symmetric_int8(centered, scale.unsqueeze(-1))
    return q, scale, mean.reshape(1)


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    flat = (q.float() * scale.unsqueeze(-1)).reshape(-1)[:n] + mean
    return flat.clamp(min=0).reshape(shape)


def quantize(x: torch.Tensor, absmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes 0..15 (uint8) with x's 2-D shape, given the (possibly double-quantized) absmax."""
    g = as_groups(x.float(), spec)  # (rows, n_groups, group_size)
    a = absmax.float().unsqueeze(-1)
    normed = torch.where(a > 0, g / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(g))
    codes = torch.bucketize(normed.clamp(-1, 1), _MIDPOINTS)
    return codes.to(torch.uint8).reshape(x.shape[0] if x.ndim > 1 else 1, -1)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = as_groups(codes, spec)  # (rows, n_groups, group_size)
    vals = CODE[g.long()] * absmax.float().unsqueeze(-1)
    return vals.reshape(codes.shape).to(dtype)
