"""lowbit's own packed weight layouts for the native kernels (kernels.c reads these and nothing else).

q4 (integer codes of 4 bits or fewer, groups of G inputs, G a multiple of 32):
    codes   uint8 (N / 32, K * 16): row block rb holds rows 32 rb .. 32 rb + 31. Within it, chunk kc
            (inputs 8 kc .. 8 kc + 7) is 128 bytes: row r's 4 bytes at 4 r; byte j holds the code of
            input 8 kc + j in its low nibble and of input 8 kc + 4 + j in its high nibble.
    params  float16 or float32 (N / 32, K / G, 2, 32): per row block and group, 32 scales then 32
            offsets; weight = code * scale + offset, codes 0..15.
q8 (symmetric int8, one scale per row):
    codes   int8 (N, K) row-major: the stored codes themselves (no second copy)
    scales  float32 (N)

Why this q4 arrangement: 4 bytes of a row sit together, so one 32-bit lane of a vector register is
one row, which is what VNNI's u8 x s8 dot product (4 products summed into each 32-bit lane) and
AVX2's maddubs + madd want; a 64-byte load covers 16 rows, a 32-byte load 8. Row blocks are
contiguous, so a fused q/k/v is the concatenation of its modules' tensors along dim 0 and each module
is a slice of it. Params sit next to their row block's codes in the same order the kernel walks them.
"""

from __future__ import annotations

import torch

ROWS = 32  # rows per block
CHUNK = 8  # inputs per chunk


def q4_supported(in_features: int, out_features: int, group: int) -> bool:
    return (in_features > 0 and out_features > 0 and in_features % group == 0 and group % 32 == 0
            and out_features % ROWS == 0)


def pack_q4(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, K) in 0..15; scale, offset (N, K // group) float. Returns (codes uint8, params);
    params in `dtype`, or float16 where that is exact enough (params_dtype)."""
    N, K = codes.shape
    if not q4_supported(K, N, group):
        raise ValueError(f"q4 layout: shape ({N}, {K}) with group {group} (needs N % 32 == 0 and K % group == 0, group % 32 == 0)")
    u = codes.to(torch.uint8).reshape(N // ROWS, ROWS, K // CHUNK, 2, 4)  # (rb, r, kc, half, j)
    u = u.permute(0, 2, 1, 4, 3)  # (rb, kc, r, j, half)
    w = (u[..., 0] | (u[..., 1] << 4)).contiguous().reshape(N // ROWS, K * 16)
    return w, pack_params(scale, offset, dtype)


def pack_params(scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale, offset (N, n_groups) -> (N / 32, n_groups, 2, 32), float16 where that is exact enough."""
    N, ng = scale.shape
    s, o = scale.float(), offset.float()
    p = torch.stack([s.reshape(N // ROWS, ROWS, ng).transpose(1, 2), o.reshape(N // ROWS, ROWS, ng).transpose(1, 2)], dim=2)
    return p.to(dtype or params_dtype(s, o)).contiguous()


def params_dtype(scale: torch.Tensor, offset: torch.Tensor) -> torch.dtype:
    """float16 when it keeps every weight within 1/64 of a quantization step of the float32 value
    (scale to 2**-10, offset to 2**-6 of the scale: fp16's rounding of normal values), float32 otherwise
    (scales out of fp16's normal range)."""
    s16, o16 = scale.half().float(), offset.half().float()
    step = scale.abs()
    ok = bool(torch.isfinite(s16).all() and torch.isfinite(o16).all()
              and ((s16 - scale).abs() <= step * 2 ** -10).all() and ((o16 - offset).abs() <= step * 2 ** -6).all())
    return torch.float16 if ok else torch.float32


def unpack_q4(w: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (N, K) codes 0..15 (int32) of a q4 codes tensor."""
    N, K = out_features, in_features
    b = w.reshape(N // ROWS, K // CHUNK, ROWS, 4)  # (rb, kc, r, j)
    u = torch.stack([b & 15, b >> 4], dim=-1)  # (rb, kc, r, j, half)
    return u.permute(0, 2, 1, 4, 3).reshape(N, K).to(torch.int32)


def unpack_params(p: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset), each (N, n_groups) float32, of a q4 params tensor."""
    nb, ng = p.shape[0], p.shape[1]
    s = p[:, :, 0, :].float().transpose(1, 2).reshape(nb * ROWS, ng)
    o = p[:, :, 1, :].float().transpose(1, 2).reshape(nb * ROWS, ng)
    return s[:out_features], o[:out_features]


def q4_weight(w: torch.Tensor, p: torch.Tensor, out_features: int, in_features: int, group: int) -> torch.Tensor:
    """The float32 (N, K) weight a q4 pair stands for (the reference the kernels are held to)."""
    s, o = unpack_params(p, out_features)
    codes = unpack_q4(w, out_features, in_features).float()
    return codes * s.repeat_interleave(group, dim=1) + o.repeat_interleave(group, dim=1)
