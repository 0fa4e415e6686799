"""CPU matmul kernels for QLinear, chosen per format and shape.

torch ships fast CPU kernels for weight-only INT8 and INT4, but only for bf16 activations and a
specific packed layout; given fp32 activations the same ops run far slower. Each
kernel here therefore owns its activation dtype: it casts the input to what the kernel wants and the
output back, so a caller can never reach the slow combination by accident.

    kernel     formats                                            how
    int8pack   int8 symmetric, per channel / per tensor           native q8 products (lowbit/native) below
                                                                  native.DEQUANT_ROWS rows, else one float GEMM;
                                                                  without native code aten._weight_int8pack_mm, bf16 x
    int4pack   int 2-4 bit, groups of 32-256 (or per channel),    native q4 layout and products (lowbit/native/layout.py)
               symmetric, int or float zero point, act-order      where the shape allows (rows a multiple of 32);
                                                                  else torch's _weight_int4pack_mm_for_cpu, bf16 x,
                                                                  on torch's own packing (read by torch only)
    int8dyn    int8 symmetric per channel, int8_dynamic/static    a real int8 x int8 GEMM: quantized::linear_dynamic
               activations                                        (fbgemm/oneDNN) on rows scaled to [-1, 1] by their
                                                                  own absmax (so activations are per token), rescaled
    bf16deq    fp8, nf4, anything else                            dequantize to bf16, bf16 F.linear
               (no fast kernel: the reference path in bf16)

Which layout an int4pack module holds is decided when it is prepared: lowbit's q4 layout when the
native kernels are available and the shape fits (`"p" in packed`), torch's int4pack otherwise
(`"sz" in packed`). Only one is ever held. No C code reads torch's packing.

`plan_kernel` says which applies and, when none of the fast ones does, why (for `lowbit info` and
the one warning). `pack` builds the kernel's tensors from a QTensor; `run` multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass

import threading
import warnings

import torch
import torch.nn.functional as F

from lowbit import native
from lowbit.native import layout
from lowbit.formats import QTensor, dequantize_tensor
from lowbit.formats.qtensor import int_codes, zero_of

INT4_GROUPS = (256, 128, 64, 32)
NATIVE_KERNELS = ("int4pack", "int8pack")  # the formats lowbit/native has products for


@dataclass(frozen=True)
class KernelPlan:
    name: str  # int8pack, int4pack, int8dyn, bf16deq, reference
    fast: bool
    reason: str = ""  # why no fast kernel applies
    group: int = 0  # int4pack: the kernel's group size
    center: int = 8  # int4pack: the middle of the stored codes' range (symmetric q + 8; asymmetric 2**(bits-1))


def _int4_group(spec, cols: int) -> int:
    """The kernel group size that fits the format's groups, or 0."""
    span = cols if spec.granularity in ("channel", "tensor") else spec.group_size
    for g in INT4_GROUPS:  # each kernel group must sit inside one format group
        if span % g == 0 and cols % g == 0:
            return g
    return 0


def plan_kernel(qt: QTensor) -> KernelPlan:
    return plan_for(qt.spec, qt.shape[1], "perm" in qt.tensors, qt.shape[0])


def plan_for(spec, in_features: int, has_perm: bool = False, out_features: int = 16) -> KernelPlan:
    """The kernel a module of this format and input width runs on (no tensors needed)."""
    if spec.activation != "none":
        return KernelPlan("int8dyn", True)
    if spec.kind == "int" and spec.bits == 8:
        if spec.symmetric and spec.granularity in ("channel", "tensor") and not has_perm:
            return KernelPlan("int8pack", True)
        why = ("group-wise int8 has no CPU kernel (int8pack takes one scale per output row)" if spec.granularity == "group"
               else "asymmetric int8 has no CPU kernel (int8pack is symmetric)")
        return KernelPlan("bf16deq", False, why + "; use the int8 preset (symmetric, per channel) for a fast path")
    if spec.kind == "int" and spec.bits <= 4:
        g = _int4_group(spec, in_features)
        if g and out_features % 16 == 0:
            return KernelPlan("int4pack", True, group=g, center=8 if spec.symmetric else 2 ** (spec.bits - 1))
        if g:
            return KernelPlan("bf16deq", False, f"int4pack needs a multiple of 16 output rows; this module has {out_features}")
        return KernelPlan("bf16deq", False, f"int4pack needs groups of 32, 64, 128 or 256 dividing the row; "
                                            f"this module has {spec.granularity} {spec.group_size or ''} over {in_features} inputs")
    if spec.kind == "int":
        return KernelPlan("bf16deq", False, f"{spec.bits}-bit integers have no CPU kernel; use 4 or 8 bits")
    if spec.kind == "nf4":
        return KernelPlan("bf16deq", False, "NF4 has no fast CPU kernel in torch (bitsandbytes' CPU kernel is "
                                            "downloaded at run time); use w4-g32 or w4-g128 for speed")
    return KernelPlan("bf16deq", False, "torch has no FP8 matmul on CPU; FP8 weights are dequantized to bf16 per call")


# -- packing ---------------------------------------------------------------------------------------
def pack(qt: QTensor, plan: KernelPlan) -> dict[str, torch.Tensor]:
    t = qt.tensors
    if plan.name == "int8pack":  # the stored codes themselves (no copy) and float32 scales (a copy, rows x 4 bytes)
        return {"w": t["qdata"], "s": t["scale"].float().reshape(-1).expand(qt.shape[0]).clone()}
    if plan.name == "int4pack":
        return _pack_int4(qt, plan.group)
    if plan.name == "int8dyn":
        rows = qt.shape[0]
        scale = t["scale"].double().reshape(-1).expand(rows).contiguous()
        with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated; the GEMM is not
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(t["qdata"], scale, torch.zeros(rows, dtype=torch.long), 0)
            # the codes and scales are kept too, for decode on the native int8 kernel (int8dyn_native)
            return {"linear": torch.ops.quantized.linear_prepack(qw, None), "w": t["qdata"].contiguous(),
                    "s": scale.float().contiguous()}
    return {}


def native_layout(p: dict) -> bool:
    """Whether an int4pack module holds lowbit's q4 layout (else torch's int4pack)."""
    return "p" in p


def int8dyn_native(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (rows, cols), scales float32 (rows)) of a prepacked int8dyn weight, for the native
    int8 kernel: kept beside the prepacked GEMM weight since packing (read back from it for modules packed
    by an older lowbit).

    Few rows (decode) run faster on the native kernel than on the prepacked GEMM: W8A8 SmoothQuant
    decoded at 2.8-3.1x FP32 in benchmarks/gate_guard.py's run, where docs/BENCHMARKS.md's older
    decode-speed table (the GEMM) has 0.64x. Its activations are rounded to int8 in blocks of 32, each
    with its own scale, not with the format's one scale per token (dynamic) or calibrated range
    (static); tests/model/test_native.py holds the native step to the reference path's tolerance on
    every instruction-set path. Whole-sequence evaluation and prefill keep the per-token GEMM. The
    codes are held twice (here, from packing, and inside the prepacked weight): memory_bytes counts
    both. LOWBIT_NATIVE=0 keeps every call on the prepacked GEMM."""
    if "w" not in p:  # packed by an older lowbit: read back from the prepacked weight
        qw = torch.ops.quantized.linear_unpack(p["linear"])[0]
        p["s"] = qw.q_per_channel_scales().float().contiguous()
        p["w"] = qw.int_repr().contiguous()
    return p["w"], p["s"]


def int8_codes(p: dict) -> torch.Tensor:
    """The int8 weight codes back out of a prepacked int8dyn weight."""
    return torch.ops.quantized.linear_unpack(p["linear"])[0].int_repr()


def _has_vnni() -> bool:
    """u8 x s8 products summed in pairs overflow int16 (vpmaddubsw) unless the CPU has VNNI, so without
    it activations keep 7 bits (reduce_range), as PyTorch's own dynamic quantization does."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


REDUCE_RANGE = not _has_vnni()


def _pack_int4(qt: QTensor, g: int) -> dict[str, torch.Tensor]:
    """Codes as 0..15 and, per kernel group, weight = code * scale + offset: in lowbit's q4 layout when
    the native kernels can run it, else in torch's int4pack (w = (u - 8) * scale + zero, bf16)."""
    spec, t = qt.spec, qt.tensors
    rows, cols = qt.shape
    q = int_codes(qt).to(torch.int32)  # signed (symmetric) or 0..2**b-1
    zero = zero_of(t)
    s = t["scale"].float()  # (rows or 1, n_groups)
    if zero is None:  # symmetric: u = q + 8 and w = s * q = s * u - 8 s
        u, off = q + 8, -8 * s
    elif zero.is_floating_point():  # w = s * q + m
        u, off = q, zero.float().expand_as(s)
    else:  # w = s * (q - zp)
        u, off = q, -zero.float() * s
    s, off = s.expand(rows, -1), off.expand(rows, -1)
    rep = (cols if spec.granularity != "group" else spec.group_size) // g  # kernel groups per format group
    s, off = s.repeat_interleave(rep, dim=1), off.repeat_interleave(rep, dim=1)  # (rows, cols // g)
    out: dict[str, torch.Tensor] = {}
    if native.available() and native.int4_supported(cols, rows, g):
        out["w"], out["p"] = layout.pack_q4(u, s, off, g)
    else:
        z = off + 8 * s  # torch's form: w = (u - 8) * s + z
        out["sz"] = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # (cols // g, rows, 2)
        out["w"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    if "perm" in t:
        out["perm"] = t["perm"].long()
    return out


# -- running ---------------------------------------------------------------------------------------
def run(plan: KernelPlan, p: dict[str, torch.Tensor], qt_fn, x: torch.Tensor, bias: torch.Tensor | None,
        out_features: int, activation: str = "none", input_scale: torch.Tensor | None = None) -> torch.Tensor:
    shape = x.shape[:-1]
    if plan.name == "int8dyn":
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] < native.DEQUANT_ROWS and native.available() and native.int8_supported(x2.shape[1]):
            y = native.int8_mm(x2, *int8dyn_native(p))  # decode: activations in int8 blocks of 32
        else:
            y = _int8_gemm(x2, p, activation, input_scale)
    else:
        x2 = x.reshape(-1, x.shape[-1])
        if "perm" in p:  # GPTQ act-order: the stored columns are a permutation of the inputs (int4 only)
            x2 = x2.index_select(-1, p["perm"])
        rows = x2.shape[0]
        small = rows < native.DEQUANT_ROWS
        if plan.name in NATIVE_KERNELS and (native_layout(p) or plan.name == "int8pack"):
            if small and native.available() and (plan.name == "int4pack" or native.int8_supported(x2.shape[1])):
                y = _native(plan, p, x2, out_features)
            elif small and plan.name == "int8pack" and p["w"].data_ptr() % 64 == 0:
                # no native code: torch's int8 kernel (it has crashed on weights not 64-byte aligned)
                y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), p["w"], p["s"].to(torch.bfloat16)).float()
            else:
                y = _dequantized_gemm(plan, p, x2, out_features)  # prefill, or no native code for this layout
            if bias is not None:
                y = y + bias.float()
            return y.to(x.dtype).reshape(*shape, out_features)
        xb = x2.to(torch.bfloat16)
        if plan.name == "int4pack":  # torch's int4pack (native code unavailable when it was packed)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p["w"], plan.group, p["sz"])
        else:
            y = F.linear(xb, dequantize_tensor(qt_fn(), torch.bfloat16))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape, out_features)


def _native(plan: KernelPlan, p: dict, x2: torch.Tensor, out_features: int) -> torch.Tensor:
    """Small batches (decode): lowbit's native kernels on its own layouts (lowbit/native)."""
    if plan.name == "int8pack":
        return native.int8_mm(x2, p["w"], p["s"])
    return native.int4_mm(x2, p["w"], p["p"], plan.group, out_features, plan.center)


# The float weight a many-row product makes is written into one buffer per thread, reused call after
# call, instead of a fresh allocation each time (fresh multi-megabyte tensors are fresh pages to fault
# in; the cast itself stays). Weights over SCRATCH_MAX floats,
# and calls that autograd may need to replay (the buffer would be overwritten), allocate as before.
SCRATCH_MAX = 1 << 24  # floats (64 MiB)
_scratch = threading.local()


def _weight_buffer(x2: torch.Tensor, numel: int) -> torch.Tensor | None:
    if numel > SCRATCH_MAX or (torch.is_grad_enabled() and x2.requires_grad):
        return None
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel)
    return buf[:numel]


def _dequantized_gemm(plan: KernelPlan, p: dict, x2: torch.Tensor, out_features: int) -> torch.Tensor:
    """Many rows (prefill, whole-sequence evaluation), or no native code: float32 weights made once per
    call, then one float GEMM, so long inputs keep float activations (native.DEQUANT_ROWS says why there)."""
    x2 = x2.float()
    if plan.name == "int8pack":
        w = p["w"]
        buf = _weight_buffer(x2, w.numel())
        wf = w.t().float() if buf is None else buf.view(w.shape).copy_(w).t()
        return torch.mm(x2, wf) * p["s"]
    if native.available():
        buf = _weight_buffer(x2, out_features * x2.shape[1])
        return torch.mm(x2, native.int4_dequant_t(p["w"], p["p"], plan.group, out_features, out=buf))
    return torch.mm(x2, layout.q4_weight(p["w"], p["p"], out_features, x2.shape[1], plan.group).t())


def _int8_gemm(x2: torch.Tensor, p: dict, activation: str, input_scale) -> torch.Tensor:
    x2 = x2.float()
    if activation == "int8_static":  # the calibrated range, clipped as the reference clips
        amax = (127 * input_scale.float()).reshape(1, 1)
        xn = (x2 / amax).clamp(-1, 1)
    else:
        amax = x2.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        xn = x2 / amax
    return torch.ops.quantized.linear_dynamic(xn, p["linear"], REDUCE_RANGE) * amax


def int4_codes(p: dict[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The 0..15 codes (rows, cols) back out of an int4pack module's kernel tensors. lowbit's q4 layout
    is unpacked directly; torch's int4pack is private to torch, so it is read through torch's own kernel:
    identity activations with scale 1 and zero 8 return the codes."""
    if native_layout(p):
        return layout.unpack_q4(p["w"], rows, cols)
    sz = torch.stack([torch.ones(cols // 32, rows), torch.full((cols // 32, rows), 8.0)], -1).to(torch.bfloat16)
    out = torch.empty(rows, cols, dtype=torch.int32)
    for i in range(0, cols, 1024):  # identity rows in blocks keep the temporary small
        eye = torch.zeros(min(1024, cols - i), cols, dtype=torch.bfloat16)
        eye[:, i:i + eye.shape[0]].fill_diagonal_(1)
        out[:, i:i + eye.shape[0]] = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, p["w"], 32, sz).t().to(torch.int32)
    return out
