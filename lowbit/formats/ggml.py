"""ggml's legacy block types Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1: packing codes into blocks, and ggml's
own quantizers.

Every type cuts a row into blocks of 32 consecutive weights and stores each block as a run of bytes
(little-endian); a row of n weights is n/32 blocks back to back, with nothing between rows.

    type   weights  bytes  fields, in order                                  one weight x_i (i = 0..31)
    Q8_0   32       34     d: fp16, q: 32 x int8                               x_i = d * q_i
    Q5_0   32       22     d: fp16, qh: 4 bytes (5th bits), qs: 16 bytes       x_i = d * (q_i - 16),  q_i in 0..31
    Q5_1   32       24     d: fp16, m: fp16, qh: 4 bytes, qs: 16 bytes         x_i = d * q_i + m,     q_i in 0..31
    Q4_0   32       18     d: fp16, qs: 16 bytes (two 4-bit codes)             x_i = d * (q_i - 8),   q_i in 0..15
    Q4_1   32       20     d: fp16, m: fp16, qs: 16 bytes                      x_i = d * q_i + m,     q_i in 0..15

qs, in every 4- and 5-bit type: byte j carries the low four bits of code j in its low nibble and
those of code j + 16 in its high nibble: the first half of the block sits in the low nibbles, the
second half in the high ones. (This differs from lowbit's own packing.py, where neighbouring codes
share a byte.) qh, in the 5-bit types: the four bytes read as one little-endian uint32 whose bit i
is bit 4 (the fifth bit, value 16) of code i; so byte k holds codes 8k..8k+7, lowest bit first.

The quantizers repeat ggml's reference C code (quantize_row_q*_ref) in torch, so their bytes equal
gguf-py's and llama.cpp's:
    Q8_0  d = max|x| / 127;                q = roundf(x / d)            (halves away from zero)
    Q4_0  d = x_max / -8, x_max the signed value of largest magnitude;
                                           q = min(15, trunc(x / d + 8.5))
    Q4_1  d = (max x - min x) / 15, m = min x;
                                           q = min(15, trunc((x - m) / d + 0.5))
    Q5_0  d = x_max / -16 (as Q4_0);       q = min(31, trunc(x / d + 16.5))
    Q5_1  d = (max x - min x) / 31, m = min x;
                                           q = min(31, trunc((x - m) / d + 0.5))
As in ggml, "x / d" is x times 1/d in float32 (a true division can land a tie on the other side),
and d is rounded to fp16 only when it is stored. A block whose d comes out 0 (all zeros; for Q4_1
and Q5_1 any constant block) takes 1/d as 0, so its codes are 0 (Q4_0: 8, Q5_0: 16). Taking d from
the signed extreme puts that weight on code 0 (value -16d = x_max) and leaves the opposite end of
the grid (+15d) one step short of -x_max: a weight near -x_max is clipped to code 31.

Some lowbit int schemes already are one of these types (group 32, fp16 scales): int8 symmetric is
Q8_0, int5 / int4 symmetric are Q5_0 / Q4_0 once their signed codes (-16..15 / -8..7) are shifted
by 16 / 8, int5 / int4 with a float offset are Q5_1 / Q4_1. `blocks_from_qtensor` packs such a
QTensor's codes and scales unchanged, without requantizing. That holds whatever rule chose the
scale: lowbit's symmetric rule (d = max|x| / 15 for int5, codes -15..15 in practice) is not ggml's
(d = x_max / -16), so the blocks differ from what ggml would quantize the float weight to, but they
hold exactly lowbit's weights: d is the stored fp16 scale and d * (q - 16) is lowbit's s * code.
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
    """(…, 32) codes -> (…, 16) bytes: byte j holds the low four bits of code j (low nibble) and of
    code j+16 (high nibble)."""
    q = q.to(torch.uint8) & 0x0F
    return q[..., :16] | (q[..., 16:] << 4)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(…, 32) codes 0..31 -> (…, 4) bytes qh: bit i of the little-endian uint32 is bit 4 of code i."""
    bits = ((q.to(torch.uint8) >> 4) & 1).reshape(*q.shape[:-1], 4, 8)  # byte k: codes 8k..8k+7
    weight = 2 ** torch.arange(8, dtype=torch.uint8, device=q.device)  # code 8k+i is bit i of byte k
    return (bits * weight).sum(-1, dtype=torch.uint8)


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


def pack_q5_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) 0..31 (value = d * (code - 16)) -> Q5_0 blocks of 22 bytes."""
    rows = q.shape[0]
    qb = q.reshape(rows, -1, BLOCK)
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), _fifth_bits(qb), _nibbles(qb)], dim=-1).reshape(rows, -1)


def pack_q5_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) 0..31 (value = d * code + m) -> Q5_1 blocks of 24 bytes."""
    rows = q.shape[0]
    qb = q.reshape(rows, -1, BLOCK)
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), _fp16_bytes(m.reshape(rows, -1, 1)), _fifth_bits(qb),
                      _nibbles(qb)], dim=-1).reshape(rows, -1)


# -- ggml's reference quantizers: float weights -> blocks -------------------------------------------
def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q8_0 blocks, as ggml's quantize_row_q8_0_ref writes them."""
    b = _blocks(w)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return pack_q8_0(_roundf(b * inv).reshape(w.shape), d)


def _signed_extreme_codes(w: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q4_0 / Q5_0 rule, half = 8 / 16: d = x_max / -half (x_max the signed value of largest
    magnitude), codes min(2*half - 1, trunc(x / d + half + 0.5)). Returns (codes (rows, cols), d)."""
    b = _blocks(w)
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))
    d = mx / -half
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + (half + 0.5)).clamp(0, 2 * half - 1)
    return q.reshape(w.shape), d


def _min_max_codes(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's Q4_1 / Q5_1 rule, levels = 16 / 32: d = (max - min) / (levels - 1), m = min, codes
    min(levels - 1, trunc((x - m) / d + 0.5)). Returns (codes (rows, cols), d, m)."""
    b = _blocks(w)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / (levels - 1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((b - lo) * inv + 0.5).clamp(0, levels - 1)
    return q.reshape(w.shape), d, lo


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q4_0 blocks, as ggml's quantize_row_q4_0_ref writes them."""
    return pack_q4_0(*_signed_extreme_codes(w, 8))


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q4_1 blocks, as ggml's quantize_row_q4_1_ref writes them."""
    return pack_q4_1(*_min_max_codes(w, 16))


def quantize_q5_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q5_0 blocks, as ggml's quantize_row_q5_0_ref writes them."""
    return pack_q5_0(*_signed_extreme_codes(w, 16))


def quantize_q5_1(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float weights -> Q5_1 blocks, as ggml's quantize_row_q5_1_ref writes them."""
    return pack_q5_1(*_min_max_codes(w, 32))


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q5_0": quantize_q5_0, "Q5_1": quantize_q5_1, "Q4_0": quantize_q4_0,
              "Q4_1": quantize_q4_1}
BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q5_1": 24, "Q4_0": 18, "Q4_1": 20}  # bytes per block of 32 weights


# -- lowbit storage that already is a ggml block type -----------------------------------------------
def exact_type(spec: QuantSpec, cols: int) -> str | None:
    """The block type whose layout a scheme's codes and scales already have (rows of `cols` weights), else None."""
    if (spec.kind != "int" or spec.granularity != "group" or spec.group_size != BLOCK
            or spec.scale_dtype != "float16" or cols % BLOCK):
        return None
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    if spec.bits in (5, 4):
        if spec.symmetric:
            return f"Q{spec.bits}_0"
        if spec.zero_domain == "float":
            return f"Q{spec.bits}_1"
    return None  # int zero points (x = s * (q - z)) and the other widths have no block type


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
    if type_name == "Q5_0":
        return type_name, pack_q5_0(int_codes(qt) + 16, t["scale"])  # signed codes -16..15 -> 0..31
    if type_name == "Q4_1":
        return type_name, pack_q4_1(int_codes(qt), t["scale"], t["offset"])
    return type_name, pack_q5_1(int_codes(qt), t["scale"], t["offset"])
