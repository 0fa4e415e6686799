"""Read a safetensors file one tensor at a time with plain reads (no memory map).

A memory map keeps every page it touched resident (and counted in RSS) until it is closed, so
walking a whole checkpoint through safe_open grows the process by the file's size. Reading each
tensor into its own buffer keeps at most one float tensor alive, which is what the
quantize-while-loading path promises. The header is checked by sources.check_safetensors first.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            f.seek(base + start)
            buf = bytearray(end - start)
            f.readinto(buf)
            dtype = DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, t.reshape(info["shape"])


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}}) of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def read_tensor(path: Path, base: int, info: dict) -> torch.Tensor:
    """One tensor of a safetensors file by its header entry, read into its own buffer (no memory map)."""
    start, end = info["data_offsets"]
    buf = bytearray(end - start)
    with open(path, "rb") as f:
        f.seek(base + start)
        f.readinto(buf)
    dtype = DTYPES[info["dtype"]]
    t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
    return t.reshape(info["shape"])
