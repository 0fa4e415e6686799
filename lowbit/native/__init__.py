"""lowbit's native CPU kernels (kernels.c), built on first use with the system C compiler.

Batch-1 decoding is memory-bound: a matrix-vector product should read its weights at memory speed.
torch's int4pack / int8pack CPU kernels do not at M = 1 on AVX2 machines (they unpack every weight to
floats and run compute-bound, far below memory speed), so for small batches QLinear calls these
instead, on the very tensors torch's kernels use (no second copy of the weights).

Why C through ctypes and not a torch C++ extension: the file compiles in about a second with nothing
but a C compiler (a torch extension needs ninja and torch's headers, and a minute), and the kernels
need no torch API. Why not torch.compile: its CPU code generation needs the same compiler, takes
minutes per model, and would still call torch's slow kernels for the matmuls.

The build goes to $LOWBIT_CACHE/native (default ~/.cache/lowbit/native), named by a hash of the
source and flags, written to a temporary name and renamed into place. Without a compiler, on a CPU
without AVX2 + FMA, or with LOWBIT_NATIVE=0, `available()` is False and QLinear keeps torch's kernels;
`why_not()` says which.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-std=c11", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-pthread"]
MAX_ROWS = 8  # up to this many rows of x, the native int4/int8 products
DEQUANT_ROWS = 128  # from this many rows, float weights dequantized once per call and one float GEMM (prefill);
# in between, torch's own int4pack / int8pack kernels were faster here (benchmarks/decode_speed.py)

_lib: ctypes.CDLL | None = None
_why: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    return Path(base) / "native"


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"lowbit_kernels_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            said = r.stderr.strip()[-500:] or "no message"
            raise OSError(f"{cc} exited with {r.returncode}: {said}; fix: install gcc, or set CC to a working C compiler")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        _why = "turned off by LOWBIT_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except OSError as e:
        _why = f"the native kernels could not be built or loaded ({e})"
        return None
    if not lib.lb_supported():
        _why = "this CPU lacks AVX2 + FMA"
        return None
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.lb_q4_mm.argtypes = [P, I, I, P, P, ctypes.c_long, I, I, I, P, I]
    lib.lb_q8_mm.argtypes = [P, I, I, P, P, I, P, I]
    lib.lb_q4_dequant_t.argtypes = [P, P, ctypes.c_long, I, I, I, P, I]
    lib.lb_q4_mm.restype = lib.lb_q8_mm.restype = lib.lb_q4_dequant_t.restype = I
    _lib = lib
    return lib


_threads: int | None = None  # set by single_threaded_torch(): the threads these kernels use meanwhile
_depth = 0  # single_threaded_torch blocks open now, in any thread
_saved = 1
_lock = threading.Lock()


def threads() -> int:
    return _threads or torch.get_num_threads()


class single_threaded_torch:
    """For a decode loop: torch's own ops (tiny at one token) run on one thread while these kernels
    keep the threads torch had. Two thread pools that both spin on the same few cores slow each other
    down many times over; this way only one of them is ever awake. torch's thread count is process-wide,
    so concurrent loops (a server's requests) share one setting: the first block in saves and sets it,
    the last block out restores it."""

    def __enter__(self):
        global _threads, _depth, _saved
        with _lock:
            if _depth == 0:
                _saved = torch.get_num_threads()
                _threads = _saved
                if available():
                    torch.set_num_threads(1)
            _depth += 1
        return self

    def __exit__(self, *exc):
        global _threads, _depth
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved)
                _threads = None
        return False


_off = 0  # > 0 inside disabled()


class disabled:
    """Within this block QLinear and the lean loop use torch's kernels only (for side-by-side checks)."""

    def __enter__(self):
        global _off
        _off += 1
        return self

    def __exit__(self, *exc):
        global _off
        _off -= 1
        return False


def available() -> bool:
    return _off == 0 and _load() is not None


def why_not() -> str:
    """Why the native kernels are not in use ('' when they are)."""
    _load()
    return "turned off for this block (native.disabled())" if _off and not _why else (_why or "")


def int4_supported(in_features: int, out_features: int, group: int) -> bool:
    return in_features % group == 0 and group % 32 == 0 and out_features % 32 == 0


def int8_supported(in_features: int) -> bool:
    return in_features % 32 == 0


def int4_mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor, out_features: int,
            center: int = 8) -> torch.Tensor:
    """x (M, K) @ the int4pack weight (w, sz) -> (M, N) float32. `center`: the middle of the codes'
    range (8 for symmetric formats, stored as q + 8; 2**(bits-1) for asymmetric ones)."""
    lib = _load()
    x = x.float().contiguous()
    M, K = x.shape
    y = torch.empty(M, out_features, dtype=torch.float32)
    if not w.is_contiguous() or sz.stride(2) != 1 or sz.stride(1) != 2:
        raise RuntimeError("native int4 kernel: the packed weight must be contiguous and sz (groups, N, 2) row-major")
    rc = lib.lb_q4_mm(x.data_ptr(), M, K, w.data_ptr(), sz.data_ptr(), sz.stride(0), out_features, group, center,
                      y.data_ptr(), threads())
    if rc:
        raise RuntimeError(f"native int4 kernel refused shape ({M}, {K}) x ({out_features}, {K}), group {group}")
    return y


def int4_dequant_t(w: torch.Tensor, group: int, sz: torch.Tensor, out_features: int) -> torch.Tensor:
    """The float32 weight, transposed (K, N), of an int4pack weight (for many-row products)."""
    lib = _load()
    K = w.shape[1] * 2
    if not w.is_contiguous() or sz.stride(2) != 1 or sz.stride(1) != 2:
        raise RuntimeError("native int4 dequantize: the packed weight must be contiguous and sz (groups, N, 2) row-major")
    wt = torch.empty(K, out_features)
    if lib.lb_q4_dequant_t(w.data_ptr(), sz.data_ptr(), sz.stride(0), out_features, K, group, wt.data_ptr(), threads()):
        raise RuntimeError(f"native int4 dequantize refused shape ({out_features}, {K}), group {group}")
    return wt


def int8_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (w * s)^T, w int8 (N, K), s bf16 (N) -> (M, N) float32."""
    lib = _load()
    x = x.float().contiguous()
    M, K = x.shape
    N = w.shape[0]
    if not w.is_contiguous() or not s.is_contiguous():
        raise RuntimeError("native int8 kernel: weight and scales must be contiguous")
    y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.lb_q8_mm(x.data_ptr(), M, K, w.data_ptr(), s.data_ptr(), N, y.data_ptr(), threads())
    if rc:
        raise RuntimeError(f"native int8 kernel refused shape ({M}, {K}) x ({N}, {K})")
    return y
