"""lowbit's native CPU kernels (kernels.c), built on first use with the system C compiler.

Batch-1 decoding is memory-bound: a matrix-vector product should read its weights at memory speed.
These kernels do, on weight layouts lowbit defines and packs itself (layout.py), so they never read a
layout private to torch (torch packs its int4 tensors differently per instruction set and release).

Dispatch: one build of kernels.c per instruction set, picked once per process from what the CPU
reports (cpuid and the OS's saved register state, read by the portable build):

    avx512vnni  AVX-512 F/BW/VL + VNNI (u8 x s8 dot products into 32-bit lanes)
    avx512      AVX-512 F/BW/VL, maddubs + madd
    avx2        AVX2 + FMA + F16C
    generic     portable C, no intrinsics (any CPU the compiler targets; tested on x86-64 only)

LOWBIT_ISA=<one of these> forces a path (a path the CPU cannot run falls back to the best one it can,
saying so once); LOWBIT_NATIVE=0 turns native code off. When a build loads, a known-answer self-check
runs each kernel on small fixed inputs against torch (benchmarks/native_paths.py times it); a mismatch turns native
code off for the process with one line naming the kernel, the path and the CPU, and lowbit runs on
torch's kernels.

Why C through ctypes and not a torch C++ extension: the one file compiles quickly with nothing but a
C compiler (build times per path: docs/BENCHMARKS.md, section "Native kernel paths"), while a torch
extension needs ninja and torch's headers and compiles far longer, and the kernels need no torch API.
Why not torch.compile: its CPU code generation needs the same compiler, compiles again for every
model, and would still call torch's kernels for the matmuls.

Builds go to $LOWBIT_CACHE/native (default ~/.cache/lowbit/native), named by a hash of the source,
compiler and flags, written to a temporary name and renamed into place. LOWBIT_NATIVE_SANITIZE=1
builds with AddressSanitizer and UndefinedBehaviorSanitizer (tests/model/test_native_sanitized.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.native import layout

SOURCE = Path(__file__).with_name("kernels.c")
BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread"]
SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
ISAS = ("avx512vnni", "avx512", "avx2", "generic")  # best first
_X86_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-DLB_AVX2"]
_X86_AVX512 = _X86_AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-DLB_AVX512"]
ISA_FLAGS = {"generic": [], "avx2": _X86_AVX2, "avx512": _X86_AVX512,
             "avx512vnni": _X86_AVX512 + ["-mavx512vnni", "-DLB_VNNI"]}
F_AVX2, F_FMA, F_F16C, F_AVX512F, F_AVX512BW, F_AVX512VL, F_VNNI = 1, 2, 4, 8, 16, 32, 64
FEATURE_NAMES = {F_AVX2: "avx2", F_FMA: "fma", F_F16C: "f16c", F_AVX512F: "avx512f", F_AVX512BW: "avx512bw",
                 F_AVX512VL: "avx512vl", F_VNNI: "avx512_vnni"}
NEEDS = {"generic": 0, "avx2": F_AVX2 | F_FMA | F_F16C}
NEEDS["avx512"] = NEEDS["avx2"] | F_AVX512F | F_AVX512BW | F_AVX512VL
NEEDS["avx512vnni"] = NEEDS["avx512"] | F_VNNI

# Products of fewer rows than this run on the native kernels (int8 activations); from here on
# (prefill, whole-sequence evaluation) the weights are dequantized to float once per call for one float
# GEMM, so long inputs keep float activations. benchmarks/native_paths.py times both sides of the limit
# (docs/BENCHMARKS.md, section "Native kernel paths"): INT8's float GEMM catches up with its native
# kernel around here; INT4's native kernel stays faster.
DEQUANT_ROWS = 64


class Kernels:
    """One loaded build: its path name and its C functions with their argument types."""

    def __init__(self, isa: str, lib: ctypes.CDLL) -> None:
        self.isa, self.lib = isa, lib
        P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.lb_q4_mm.argtypes = [P, I, I, P, P, I, I, I, I, P, I]
        lib.lb_q8_mm.argtypes = [P, I, I, P, P, I, P, I]
        lib.lb_q4_dequant_t.argtypes = [P, P, I, I, I, I, P, I]
        lib.lb_dense_mv.argtypes = [P, I, P, I, I, P, I]
        lib.lb_attention.argtypes = [P, P, P, I, I, I, I, I, I, F, P, P, I]
        for f in (lib.lb_q4_mm, lib.lb_q8_mm, lib.lb_q4_dequant_t, lib.lb_dense_mv, lib.lb_attention):
            f.restype = I
        lib.lb_decoder_new.argtypes = [I, I, I, I, I, I, I, I, F, F]
        lib.lb_decoder_new.restype = P
        lib.lb_decoder_free.argtypes = [P]
        lib.lb_decoder_set_globals.argtypes = [P, P, I, F]
        lib.lb_decoder_set_layer.argtypes = [P, I, P, P, P, P, P, P, P, P, I, P, P]
        lib.lb_decoder_set_linear.argtypes = [P, I, I, I, I, I, I, I, I, P, P, P, P]
        lib.lb_decoder_set_linear.restype = I
        lib.lb_decoder_step.argtypes = [P, P, I, P, I]
        lib.lb_decoder_step.restype = I


_libs: dict[str, Kernels] = {}  # every build loaded in this process, by path
_active: Kernels | None = None  # the one QLinear and the decoder use
_why: str | None = None  # why native code is off ('' once chosen)
_checked: dict[str, str] = {}  # using(): each path's self-check verdict, once per process
_load_lock = threading.RLock()


def _cache_dir() -> Path:
    base = os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    return Path(base) / "native"


def _sanitized() -> bool:
    return os.environ.get("LOWBIT_NATIVE_SANITIZE", "0") == "1"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler (cc, gcc or clang) on PATH; fix: install gcc, or set CC")
    return cc


def _build(isa: str) -> Path:
    cc = _compiler()
    flags = BASE_FLAGS + ISA_FLAGS[isa] + (SANITIZE_FLAGS if _sanitized() else [])
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"lowbit_kernels_{isa}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            said = r.stderr.strip()[-500:] or "no message"
            raise OSError(f"{cc} exited with {r.returncode} building the {isa} path: {said}; "
                          f"fix: install gcc, or set CC to a working C compiler")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _open(isa: str) -> Kernels:
    """Build (once) and load one path's library; OSError when that fails."""
    with _load_lock:
        k = _libs.get(isa)
        if k is None:
            k = Kernels(isa, ctypes.CDLL(str(_build(isa))))
            if ISAS[len(ISAS) - 1 - k.lib.lb_isa()] != isa:  # lb_isa: 0 generic .. 3 avx512vnni
                raise OSError(f"the {isa} build reports path number {k.lib.lb_isa()}")
            _libs[isa] = k
        return k


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_features() -> int:
    """The instruction-set bits the CPU and OS support (0 off x86 or without a compiler)."""
    try:
        return int(_open("generic").lib.lb_cpu_features())
    except OSError:
        return 0


def supported_isas() -> list[str]:
    """The paths this CPU can run, best first (generic always, when a compiler exists)."""
    f = cpu_features()
    return [isa for isa in ISAS if f & NEEDS[isa] == NEEDS[isa]]


def missing(isa: str) -> str:
    """The CPU features `isa` needs that this CPU lacks, by name."""
    lack = NEEDS[isa] & ~cpu_features()
    return ", ".join(name for bit, name in FEATURE_NAMES.items() if lack & bit)


def requested_isa() -> str | None:
    """LOWBIT_ISA, checked: None for auto. A value that is not a path is a LowbitError."""
    want = os.environ.get("LOWBIT_ISA", "").strip().lower()
    if want in ("", "auto"):
        return None
    if want not in ISAS:
        raise LowbitError(f"LOWBIT_ISA='{os.environ['LOWBIT_ISA']}': not a native kernel path; fix: set it to one of "
                          f"{', '.join(ISAS)} or auto, or unset it (LOWBIT_NATIVE=0 turns native code off)")
    return want


def _say(line: str) -> None:
    print(f"lowbit: {line}", file=sys.stderr)


def _load() -> Kernels | None:
    global _active, _why
    if _active is not None or _why is not None:
        return _active
    with _load_lock:
        if _active is not None or _why is not None:
            return _active
        if os.environ.get("LOWBIT_NATIVE", "1") == "0":
            _why = "turned off by LOWBIT_NATIVE=0"
            return None
        want = requested_isa()
        try:
            _open("generic")  # the portable build: it reads the CPU's features
        except OSError as e:
            _why = f"the native kernels could not be built or loaded ({e})"
            return None
        isas = supported_isas()
        pick = isas[0]
        if want is not None and want not in isas:
            pick = next(i for i in isas if ISAS.index(i) > ISAS.index(want))
            _say(f"LOWBIT_ISA={want} asked, but this CPU ({cpu_name()}) lacks {missing(want)}; the {pick} path runs")
        elif want is not None:
            pick = want
        try:
            k = _open(pick)
        except OSError as e:
            _why = f"the native kernels could not be built or loaded ({e})"
            return None
        bad = selfcheck(k)
        if bad:
            _why = f"the self-check failed: {bad} on the {pick} path of this CPU ({cpu_name()}); lowbit runs on torch's kernels"
            _say(_why)
            return None
        _active, _why = k, ""
        return k


def isa() -> str:
    """The path in use ('' when native code is off)."""
    k = _load() if not _off else None
    return k.isa if k is not None else ""


def describe() -> str:
    """One line for `lowbit info`, `lowbit generate` and the benchmarks: which path runs, or why none."""
    k = _load()
    if k is None:
        return f"native kernels off: {_why}"
    forced = " (forced by LOWBIT_ISA)" if requested_isa() == k.isa else ""
    return f"native {k.isa}{forced} on {cpu_name()}"


@contextlib.contextmanager
def using(isa_name: str):
    """Within this block the native kernels run on path `isa_name` (tests run every path the CPU has).
    A path the CPU cannot run is a LowbitError; its self-check must pass."""
    global _active, _why
    if isa_name not in ISAS:
        raise LowbitError(f"native path '{isa_name}': unknown; use one of {', '.join(ISAS)}")
    if isa_name not in supported_isas():
        raise LowbitError(f"native path '{isa_name}': this CPU ({cpu_name()}) lacks {missing(isa_name)}")
    k = _open(isa_name)
    if isa_name not in _checked:
        _checked[isa_name] = selfcheck(k)
    bad = _checked[isa_name]
    if bad:
        raise RuntimeError(f"native path {isa_name}: self-check failed: {bad}")
    with _load_lock:
        saved = (_active, _why)
        _active, _why = k, ""
    try:
        yield k
    finally:
        with _load_lock:
            _active, _why = saved


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
    """Within this block modules prepared anew and the lean loop use torch's kernels only (for
    side-by-side checks); modules already holding lowbit's q4 layout run it through torch ops."""

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
    return layout.q4_supported(in_features, out_features, group)


def int8_supported(in_features: int) -> bool:
    return in_features >= 32 and in_features % 32 == 0


def _lib() -> ctypes.CDLL:
    k = _load()
    if k is None:
        raise RuntimeError(f"native kernels unavailable: {why_not()}")
    return k.lib


def int4_mm(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, group: int, out_features: int, center: int = 8,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) @ the q4 weight (codes w, params p; layout.py) -> (M, N) float32. `center`: the middle of
    the codes' range (8 for symmetric formats, stored as q + 8; 2**(bits-1) for asymmetric ones)."""
    lib = lib or _lib()
    x = x.float().contiguous()
    M, K = x.shape
    N = out_features
    _check_q4(w, p, N, K, group)
    y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.lb_q4_mm(x.data_ptr(), M, K, w.data_ptr(), p.data_ptr(), int(p.dtype == torch.float32), N, group, center,
                      y.data_ptr(), threads())
    if rc:
        raise RuntimeError(f"native int4 kernel refused shape ({M}, {K}) x ({N}, {K}), group {group}")
    return y


def _check_q4(w: torch.Tensor, p: torch.Tensor, N: int, K: int, group: int) -> None:
    if (w.dtype != torch.uint8 or not w.is_contiguous() or tuple(w.shape) != (N // 32, K * 16)
            or p.dtype not in (torch.float16, torch.float32) or not p.is_contiguous()
            or tuple(p.shape) != (N // 32, K // max(group, 1), 2, 32)):
        raise RuntimeError(f"native int4 kernel: the weight is not in lowbit's q4 layout for ({N}, {K}) group {group} "
                           f"(codes {tuple(w.shape)} {w.dtype}, params {tuple(p.shape)} {p.dtype})")


def int4_dequant_t(w: torch.Tensor, p: torch.Tensor, group: int, out_features: int,
                   lib: ctypes.CDLL | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight, transposed (K, N), of a q4 weight (for many-row products); written into out
    (a contiguous float32 buffer of K * N elements) when given."""
    lib = lib or _lib()
    N, K = out_features, w.shape[1] // 16
    _check_q4(w, p, N, K, group)
    if out is not None and (out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != K * N):
        raise RuntimeError(f"native int4 dequantize: out must be a contiguous float32 buffer of {K * N} elements")
    wt = torch.empty(K, N) if out is None else out.view(K, N)
    if lib.lb_q4_dequant_t(w.data_ptr(), p.data_ptr(), int(p.dtype == torch.float32), N, K, group, wt.data_ptr(), threads()):
        raise RuntimeError(f"native int4 dequantize refused shape ({N}, {K}), group {group}")
    return wt


def int8_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) @ (w * s)^T, w int8 (N, K), s float32 (N) -> (M, N) float32."""
    lib = lib or _lib()
    x = x.float().contiguous()
    M, K = x.shape
    N = w.shape[0]
    if (w.dtype != torch.int8 or not w.is_contiguous() or w.shape[1] != K or s.dtype != torch.float32
            or not s.is_contiguous() or s.numel() != N):
        raise RuntimeError("native int8 kernel: weight int8 (N, K) and scales float32 (N), both contiguous")
    y = torch.empty(M, N, dtype=torch.float32)
    rc = lib.lb_q8_mm(x.data_ptr(), M, K, w.data_ptr(), s.data_ptr(), N, y.data_ptr(), threads())
    if rc:
        raise RuntimeError(f"native int8 kernel refused shape ({M}, {K}) x ({N}, {K})")
    return y


# -- the self-check -------------------------------------------------------------------------------
def _act_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels round activations: int8 in blocks of 32, scale max|x| / 127 per block."""
    M, K = x.shape
    b = x.reshape(M, K // 32, 32)
    mx = b.abs().amax(-1, keepdim=True)
    inv = torch.where(mx > 0, 127.0 / mx, torch.zeros_like(mx))
    return (torch.round(b * inv).clamp(-127, 127) * (mx / 127)).reshape(M, K)


def _q4_reference(x, codes, scale, offset, G, center) -> torch.Tensor:
    """What the int4 kernel computes, from the codes and params before packing: rounded activations
    times the codes moved by `center`, plus each group's offsets (moved back by center * scale) times
    the exact sum of the group's activations."""
    K = codes.shape[1]
    s, o = scale.double(), offset.double()
    main = _act_round(x).double() @ ((codes.double() - center) * s.repeat_interleave(G, 1)).t()
    return main + x.double().reshape(x.shape[0], K // G, G).sum(-1) @ (o + center * s).t()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def selfcheck(k: Kernels) -> str:
    """Each kernel of one build on small fixed inputs against torch ('' when all agree, else which failed).
    Shapes include the tails (a row count not a multiple of 4, an odd number of 32-blocks, vector tails)."""
    g = torch.Generator().manual_seed(1234)
    lib = k.lib
    tol = 1e-4  # the references round activations as the kernels do; only float summation order differs
    try:
        for N, K, G, M, center, dtype in ((64, 256, 64, 1, 8, torch.float16), (32, 96, 32, 3, 4, torch.float32),
                                           (96, 384, 128, 2, 2, torch.float16)):
            codes = torch.randint(0, 16, (N, K), generator=g)
            scale = torch.rand(N, K // G, generator=g) * 0.02 + 0.001
            offset = -center * scale + torch.randn(N, K // G, generator=g) * 0.001
            scale, offset = scale.to(dtype).float(), offset.to(dtype).float()  # as the params hold them
            w, p = layout.pack_q4(codes, scale, offset, G, dtype)
            x = torch.randn(M, K, generator=g)
            y = int4_mm(x, w, p, G, N, center, lib=lib)
            if _rel(y, _q4_reference(x, codes, scale, offset, G, center)) > tol:
                return f"int4 product ({N}x{K}, group {G}, {M} rows, center {center}, {dtype})"
            ref_w = codes * scale.repeat_interleave(G, 1) + offset.repeat_interleave(G, 1)
            if _rel(int4_dequant_t(w, p, G, N, lib=lib), ref_w.t()) > 1e-6:
                return f"int4 dequantize ({N}x{K}, group {G})"
        for N, K, M in ((40, 96, 1), (7, 64, 3), (33, 288, 2)):
            w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
            w[0, :5] = -128
            s = torch.rand(N, generator=g) * 0.01
            x = torch.randn(M, K, generator=g)
            if _rel(int8_mm(x, w, s, lib=lib), _act_round(x) @ (w.float() * s[:, None]).t()) > tol:
                return f"int8 product ({N}x{K}, {M} rows)"
        for bf16 in (False, True):
            N, K = 20, 44
            w = torch.randn(N, K, generator=g).to(torch.bfloat16 if bf16 else torch.float32).contiguous()
            x = torch.randn(K, generator=g)
            y = torch.empty(N)
            lib.lb_dense_mv(x.data_ptr(), K, w.data_ptr(), int(bf16), N, y.data_ptr(), threads())
            if _rel(y, w.float() @ x) > 1e-5:
                return f"{'bf16' if bf16 else 'float32'} matrix-vector product ({N}x{K})"
        H, KV, D, L, lo, T, scale = 4, 2, 20, 16, 3, 9, 0.2
        q = torch.randn(H, D, generator=g)
        kc, vc = torch.randn(KV, L, D, generator=g), torch.randn(KV, L, D, generator=g)
        o, att = torch.empty(H, D), torch.empty(H, L)
        lib.lb_attention(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), H, KV, D, L, lo, T, scale, o.data_ptr(),
                         att.data_ptr(), threads())
        kk, vv = kc[:, lo:lo + T].repeat_interleave(H // KV, 0), vc[:, lo:lo + T].repeat_interleave(H // KV, 0)
        ref = torch.softmax((q[:, None, :] * kk).sum(-1) * scale, -1)[:, :, None].mul(vv).sum(1)
        if _rel(o, ref) > 1e-5:
            return f"attention ({H} heads, {KV} KV heads, head size {D})"
    except RuntimeError as e:
        return f"{e}"
    return ""
