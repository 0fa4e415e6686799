"""Write a safetensors file one tensor at a time.

safetensors' own `save_file` takes a dict of finished tensors, so everything that has to be made for
saving (int4 codes read back out of a kernel's layout, floats cast to the storage dtype) would be
alive at once: for a 1B-parameter model that is a second copy of the weights. Here the header is
written from each entry's declared dtype and shape, then each tensor is made, written and dropped in
turn, so saving holds at most one extra tensor. The file is plain safetensors (safe_open and
lowbit.model.st_reader read it). Written pages are flushed and dropped from the page cache every
`SYNC_BYTES`, so a process under a memory cgroup is not charged for a file it has finished with.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.model.st_reader import DTYPES

NAMES = {dt: name for name, dt in DTYPES.items()}
SYNC_BYTES = 256 << 20
CAST_CHUNK = 1 << 22  # elements


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]  # called once, when the entry's bytes are written; a float tensor may
    # come in a wider float dtype than declared, and is then cast chunk by chunk as it is written

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def entry_of(name: str, t: torch.Tensor) -> Entry:
    """An entry for a tensor that already exists."""
    return Entry(name, t.dtype, tuple(t.shape), lambda: t)


def _drop_cache(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_tensors(path: str | Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write `entries` to `path` as safetensors (widest dtypes first, otherwise in the given order).
    Returns the bytes written."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    # wider dtypes first (a stable sort), so every tensor starts at a multiple of its element size,
    # as safetensors' own writer arranges; readers find tensors by name, not by position
    entries = sorted(entries, key=lambda e: -torch.empty(0, dtype=e.dtype).element_size())
    pos = 0
    for e in entries:
        if e.dtype not in NAMES:
            raise ValueError(f"tensor {e.name}: dtype {e.dtype} has no safetensors name")
        if e.name in header:
            raise ValueError(f"tensor {e.name}: listed twice")
        header[e.name] = {"dtype": NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors' writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        unsynced = 0
        for e in entries:
            t = e.make()
            cast = t.dtype != e.dtype and t.is_floating_point() and e.dtype.is_floating_point
            if (t.dtype != e.dtype and not cast) or tuple(t.shape) != tuple(e.shape):
                raise ValueError(f"tensor {e.name}: declared {e.dtype} {list(e.shape)}, made {t.dtype} {list(t.shape)}")
            flat = t.detach().cpu().reshape(-1)
            step = CAST_CHUNK if cast else max(flat.numel(), 1)
            for i in range(0, flat.numel(), step):  # a float made wider than declared is cast a chunk at a time
                part = flat[i:i + step].to(e.dtype).contiguous()
                f.write(part.view(torch.uint8).numpy().data)
            unsynced += e.nbytes
            del t
            if unsynced >= SYNC_BYTES:
                _drop_cache(f)
                unsynced = 0
        _drop_cache(f)
    return 8 + len(blob) + pos
