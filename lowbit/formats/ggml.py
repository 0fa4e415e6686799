"""ggml's legacy block types Q8_0, Q4_0 and Q4_1: packing codes into blocks, and ggml's own quantizers.

Every type cuts a row into blocks of 32 consecutive weights and stores each block as a run of bytes
(little-endian); a row of n weights is n/32 blocks back to back, with nothing between rows.

    type   weights  bytes  fields, in order                        one weight x_i (i = 0..31)
    Q8_0   32       34     d: fp16, q: 32 x int8                     x_i = d * q_i
    Q4_0   32       18     d: fp16, q: 16 x uint8 (two 4-bit codes)  x_i = d * (q_i - 8),   q_i in 0..15
    Q4_1   32       20     d: fp16, m: fp16, q: 16 x uint8 (codes)   x_i = d * q_i + m,     q_i in 0..15

In the 4-bit types, byte j of q carries code j in its low nibble and code j + 16 in its high
nibble: the first half of the block sits in the low nibbles, the second half in the high ones.
(This differs from lowbit's own packing.py, where neighbouring codes share a byte.)

The quantizers repeat ggml's reference C code (quantize_row_q*_ref) in torch, so their bytes equal
gguf-py's and llama.cpp's:
    Q8_0  d = max|x| / 127;                q = roundf(x / d)            (halves away from zero)
    Q4_0  d = x_max / -8, x_max the signed value of largest magnitude;
                                           q = min(15, trunc(x / d + 8.5))
    Q4_1  d = (max x - min x) / 15, m = min x;
                                           q = min(15, trunc((x - m) / d + 0.5))
As in ggml, "x / d" is x times 1/d in float32 (a true division can land a tie on the other side),
and d is rounded to fp16 only when it is stored. A block whose d comes out 0 (all zeros; for Q4_1
any constant block) takes 1/d as 0, so its codes are 0 (Q4_0: 8).

Some lowbit int schemes already are one of these types (group 32, fp16 scales): int8 symmetric is
Q8_0, int4 symmetric is Q4_0 once its signed codes are shifted by 8, int4 with a float offset is
Q4_1. `blocks_from_qtensor` packs such a QTensor's codes and scales unchanged, without requantizing.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import QTensor, int_codes
from lowbit.formats.spec import QuantSpec

BLOCK = 32  # weights per block, along a row, for every legacy type


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) -> (rows, cols/32, 32) float32 blocks."""
    rows, cols = w.shape
    if cols % BLOCK:
        raise LowbitError(f"GGUF export: row length {cols} is not a multiple of {BLOCK}; legacy GGUF blocks need it")
    return w.float().reshape(rows, cols // BLOCK, BLOCK)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round rounds halves to even)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(..., k) floats -> (..., 2k) uint8: each value as its two little-endian fp16 bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(…, 32) codes 0..15 -> (…, 16) bytes: byte j holds code j (low) and code j+16 (high)."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


# -- packing: codes and scales -> blocks ------------------------------------------------------------
def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) int8 and scales (rows, cols/32) -> (rows, cols/32*34) uint8 Q8_0 blocks."""
    rows = q.shape[0]
    qb = q.to(torch.int8).reshape(rows, -1, BLOCK).view(torch.uint8)
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), qb], dim=-1).reshape(rows, -1)


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) 0..15 (value = d * (code - 8)) -> Q4_0 blocks of 18 bytes."""
    rows = q.shape[0]
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), _nibbles(q.reshape(rows, -1, BLOCK))], dim=-1).reshape(rows, -1)


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) 0..15 (value = d * code + m) -> Q4_1 blocks of 20 bytes."""
    rows = q.shape[0]
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), _fp16_bytes(m.reshape(rows, -1, 1)),
                      _nibbles(q.reshape(rows, -1, BLOCK))], dim=-1).reshape(rows, -1)


# -- ggml's reference quantizers: float weights -> blocks -------------------------------------------
def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q8_0 blocks, as ggml's quantize_row_q8_0_ref writes them."""
    b = _blocks(w)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return pack_q8_0(_roundf(b * inv).reshape(w.shape), d)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q4_0 blocks, as ggml's quantize_row_q4_0_ref writes them."""
    b = _blocks(w)
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
    d = mx / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15)
    return pack_q4_0(q.reshape(w.shape), d)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q4_1 blocks, as ggml's quantize_row_q4_1_ref writes them."""
    b = _blocks(w)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((b - lo) * inv + 0.5).clamp(0, 15)
    return pack_q4_1(q.reshape(w.shape), d, lo)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}


# -- lowbit storage that already is a ggml block type -----------------------------------------------
def exact_type(spec: QuantSpec, cols: int) -> str | None:
    """The block type whose layout a scheme's codes and scales already have (rows of `cols` weights), else None."""
    if (spec.kind != "int" or spec.granularity != "group" or spec.group_size != BLOCK
            or spec.scale_dtype != "float16" or cols % BLOCK):
        return None
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    if spec.bits == 4 and spec.symmetric:
        return "Q4_0"
    if spec.bits == 4 and spec.zero_domain == "float":
        return "Q4_1"
    return None


def blocks_from_qtensor(qt: QTensor) -> tuple[str, torch.Tensor] | None:
    """(type, blocks) packed from an int QTensor's own codes and scales when its storage is a block type
    bit for bit, else None. Columns stored in act-order (a `perm`) are not: ggml blocks run in input order."""
    type_name = exact_type(qt.spec, qt.shape[1])
    if type_name is None or "perm" in qt.tensors:
        return None
    t = qt.tensors
    if type_name == "Q8_0":
        return type_name, pack_q8_0(int_codes(qt), t["scale"])
    if type_name == "Q4_0":
        return type_name, pack_q4_0(int_codes(qt) + 8, t["scale"])  # signed codes -8..7 -> 0..15
    return type_name, pack_q4_1(int_codes(qt), t["scale"], t["offset"])
