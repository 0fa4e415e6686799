"""Pack unsigned sub-byte integers into uint8, row by row, and back.

Layout: values are laid out little-endian as a bit stream along the last dimension, so for 4 bits
element 2i sits in the low nibble of byte i and element 2i+1 in the high nibble; for 2 bits four
values share a byte from the low bits up. Odd widths (3, 5, 6, 7) use the same bit stream and may
straddle bytes. Each row is padded to a whole byte, so rows stay independently addressable.
"""

from __future__ import annotations

import torch


def packed_cols(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integers in [0, 2**bits) -> (rows, ceil(cols*bits/8)) uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if values.ndim != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    v = values.to(torch.int32)
    if bits == 8:
        return v.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte, done with shifts
        per = 8 // bits
        pad = (-cols) % per
        if pad:
            v = torch.nn.functional.pad(v, (0, pad))
        v = v.reshape(rows, -1, per)  # (rows, bytes, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (v << shifts).sum(dim=-1).to(torch.uint8)
    # Odd widths: expand to a bit stream and regroup by 8.
    bit_idx = torch.arange(bits, dtype=torch.int32)
    stream = ((v.unsqueeze(-1) >> bit_idx) & 1).reshape(rows, cols * bits)  # (rows, cols*bits)
    pad = (-(cols * bits)) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(rows, -1, 8)  # (rows, bytes, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (stream * weights).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """(rows, ceil(cols*bits/8)) uint8 -> (rows, cols) uint8 values in [0, 2**bits)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"unpack expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows = packed.shape[0]
    if packed.shape[1] != packed_cols(cols, bits):
        raise ValueError(f"packed width {packed.shape[1]} does not hold {cols} values of {bits} bits")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # stay in uint8: this runs on every forward of the reference path
        # one slice per slot, then interleave: scalar shifts of the uint8 tensor, cheaper on CPU than
        # one broadcast shift
        v = torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], dim=-1)  # (rows, bytes, 8 // bits)
        return v.reshape(rows, -1)[:, :cols]
    # Odd widths: every `bits` bytes hold exactly 8 values. Read each such chunk as one little-endian
    # integer (at most 56 bits) and shift the 8 values out of it: about 10 bytes of temporaries per
    # value, where a bit stream of int32 took over 60 (loading a 3-bit artifact left the allocator
    # holding hundreds of MB of them).
    pad = (-packed.shape[1]) % bits
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    chunks = packed.reshape(rows, -1, bits)  # (rows, n, bits) bytes
    word = torch.zeros(rows, chunks.shape[1], dtype=torch.int64)
    for i in range(bits):
        word |= chunks[:, :, i].to(torch.int64) << (8 * i)
    out = torch.empty(rows, chunks.shape[1], 8, dtype=torch.uint8)
    for j in range(8):
        out[:, :, j] = ((word >> (j * bits)) & mask).to(torch.uint8)
    return out.reshape(rows, -1)[:, :cols]
