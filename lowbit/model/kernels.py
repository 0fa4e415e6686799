"""CPU matmul kernels for QLinear, chosen per format and shape.

torch ships fast CPU kernels for weight-only INT8 and INT4, but only for bf16 activations and a
specific packed layout; given fp32 activations the same ops run 10-30x slower (PEERS.md). Each
kernel here therefore owns its activation dtype: it casts the input to what the kernel wants and the
output back, so a caller can never reach the slow combination by accident.

    kernel     formats                                            how
    int8pack   int8 symmetric, per channel / per tensor           aten._weight_int8pack_mm, bf16 x
    int4pack   int 2-4 bit, groups of 32-256 (or per channel),    aten._weight_int4pack_mm_for_cpu, bf16 x;
               symmetric, int or float zero point, act-order      codes unpacked to 0..15 and re-packed
    int8dyn    int8 symmetric per channel, int8_dynamic/static    a real int8 x int8 GEMM: quantized::linear_dynamic
               activations                                        (fbgemm/oneDNN) on rows scaled to [-1, 1] by their
                                                                  own absmax (so activations are per token), rescaled
    bf16deq    fp8, nf4, anything else                            dequantize to bf16, bf16 F.linear
               (no fast kernel: the reference path in bf16)

`plan_kernel` says which applies and, when none of the fast ones does, why (for `lowbit info` and
the one warning). `pack` builds the kernel's tensors from a QTensor; `run` multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch
import torch.nn.functional as F

from lowbit import native
from lowbit.formats import QTensor, dequantize_tensor
from lowbit.formats.qtensor import int_codes, zero_of

INT4_GROUPS = (256, 128, 64, 32)
NATIVE_KERNELS = ("int4pack", "int8pack")  # whose packed tensors lowbit/native also reads  # what _weight_int4pack_mm_for_cpu accepts


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
    if plan.name == "int8pack":
        scale = t["scale"].float().reshape(-1).expand(qt.shape[0]).contiguous()
        return {"w": t["qdata"], "s": scale.to(torch.bfloat16)}
    if plan.name == "int4pack":
        return _pack_int4(qt, plan.group)
    if plan.name == "int8dyn":
        rows = qt.shape[0]
        scale = t["scale"].double().reshape(-1).expand(rows).contiguous()
        with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated; the GEMM is not
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(t["qdata"], scale, torch.zeros(rows, dtype=torch.long), 0)
            return {"linear": torch.ops.quantized.linear_prepack(qw, None)}
    return {}


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
    """Codes to 0..15 and (scale, zero) per kernel group with w = (u - 8) * scale + zero."""
    spec, t = qt.spec, qt.tensors
    rows, cols = qt.shape
    q = int_codes(qt).to(torch.int32)  # signed (symmetric) or 0..2**b-1
    zero = zero_of(t)
    s = t["scale"].float()  # (rows or 1, n_groups)
    if zero is None:  # symmetric: u = q + 8 and w = s * q = (u - 8) * s
        u, z = q + 8, torch.zeros_like(s)
    elif zero.is_floating_point():  # w = s * q + m = (q - 8) * s + (m + 8 s)
        u, z = q, zero.float() + 8 * s
    else:  # w = s * (q - zp) = (q - 8) * s + (8 - zp) * s
        u, z = q, (8 - zero.float()) * s
    s, z = s.expand(rows, -1), z.expand(rows, -1)
    rep = (cols if spec.granularity != "group" else spec.group_size) // g  # kernel groups per format group
    s, z = s.repeat_interleave(rep, dim=1), z.repeat_interleave(rep, dim=1)  # (rows, cols // g)
    sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # (cols // g, rows, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    out = {"w": packed, "sz": sz}
    if "perm" in t:
        out["perm"] = t["perm"].long()
    return out


# -- running ---------------------------------------------------------------------------------------
def run(plan: KernelPlan, p: dict[str, torch.Tensor], qt_fn, x: torch.Tensor, bias: torch.Tensor | None,
        out_features: int, activation: str = "none", input_scale: torch.Tensor | None = None) -> torch.Tensor:
    shape = x.shape[:-1]
    if plan.name == "int8dyn":
        y = _int8_gemm(x.reshape(-1, x.shape[-1]), p, activation, input_scale)
    else:
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if plan.name in NATIVE_KERNELS and (rows <= native.MAX_ROWS or rows >= native.DEQUANT_ROWS) \
                and _native_fits(plan, p, x2.shape[1]):
            y = _native(plan, p, x2, out_features) if rows <= native.MAX_ROWS else _dequantized_gemm(plan, p, x2, out_features)
            if bias is not None:
                y = y + bias.float()
            return y.to(x.dtype).reshape(*shape, out_features)
        xb = x2.to(torch.bfloat16)
        if plan.name == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(xb, p["w"], p["s"])
        elif plan.name == "int4pack":
            if "perm" in p:
                xb = xb.index_select(-1, p["perm"])
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p["w"], plan.group, p["sz"])
        else:
            y = F.linear(xb, dequantize_tensor(qt_fn(), torch.bfloat16))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape, out_features)


def _native_fits(plan: KernelPlan, p: dict, cols: int) -> bool:
    if not native.available():
        return False
    if plan.name == "int8pack":
        return native.int8_supported(cols)
    return native.int4_supported(cols, p["sz"].shape[1], plan.group)


def _native(plan: KernelPlan, p: dict, x2: torch.Tensor, out_features: int) -> torch.Tensor:
    """Small batches (decode): lowbit's native kernels on the same packed tensors (lowbit/native)."""
    if plan.name == "int8pack":
        return native.int8_mm(x2, p["w"], p["s"])
    if "perm" in p:
        x2 = x2.index_select(-1, p["perm"])
    return native.int4_mm(x2, p["w"], plan.group, p["sz"], out_features, plan.center)


def _dequantized_gemm(plan: KernelPlan, p: dict, x2: torch.Tensor, out_features: int) -> torch.Tensor:
    """Many rows (prefill): float32 weights made once per call, then one float GEMM. At this size the
    product is compute-bound, and torch's int4pack / int8pack unpack the weights again for every row
    block (0.5-0.6x the FP32 model's prefill speed here, docs/BENCHMARKS.md)."""
    x2 = x2.float()
    if plan.name == "int8pack":
        return torch.mm(x2, p["w"].t().float()) * p["s"].float()
    if "perm" in p:
        x2 = x2.index_select(-1, p["perm"])
    return torch.mm(x2, native.int4_dequant_t(p["w"], plan.group, p["sz"], out_features))


def _int8_gemm(x2: torch.Tensor, p: dict, activation: str, input_scale) -> torch.Tensor:
    x2 = x2.float()
    if activation == "int8_static":  # the calibrated range, clipped as the reference clips
        amax = (127 * input_scale.float()).reshape(1, 1)
        xn = (x2 / amax).clamp(-1, 1)
    else:
        amax = x2.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        xn = x2 / amax
    return torch.ops.quantized.linear_dynamic(xn, p["linear"], REDUCE_RANGE) * amax


def int4_codes(p: dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    """The 0..15 codes (rows, cols) back out of an int4pack weight. The packed layout is torch's own,
    so read it through the kernel: identity activations with scale 1 and zero 8 return the codes."""
    rows = p["sz"].shape[1]
    sz = torch.stack([torch.ones(cols // 32, rows), torch.full((cols // 32, rows), 8.0)], -1).to(torch.bfloat16)
    out = torch.empty(rows, cols, dtype=torch.int32)
    for i in range(0, cols, 1024):  # identity rows in blocks keep the temporary small
        eye = torch.zeros(min(1024, cols - i), cols, dtype=torch.bfloat16)
        eye[:, i:i + eye.shape[0]].fill_diagonal_(1)
        out[:, i:i + eye.shape[0]] = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, p["w"], 32, sz).t().to(torch.int32)
    return out
