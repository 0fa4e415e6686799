"""QLinear: an nn.Linear replacement that holds a QTensor's stored tensors as buffers.

Two ways to run it:
- the reference path (`kernel="reference"`): dequantize to the activation dtype, then F.linear; with
  int8 activations, per-token (or calibrated static) int8 x int8 -> int32 through torch._int_mm. Tests
  hold every fast path to this one.
- the fast path (`kernel="auto"`, the default): the CPU kernel lowbit.model.kernels picks for the
  format and shape (int8pack, int4pack, int8dyn), each casting activations to the dtype its kernel is
  fast with. Formats with no fast kernel run dequantize-to-bf16 and say so once (`prepare_model`).

With int4pack the packed weight replaces `qdata` in memory (the layout differs and holding both
would double the weight memory); `qdata` is rebuilt from it whenever the stored form is needed
(`qtensor()`, `state_dict()`, saving).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QTensor, QuantSpec, dequantize_tensor, quantize_tensor
from lowbit.formats import packing
from lowbit.formats.affine import quantize_symmetric_int8, range_scale
from lowbit import native
from lowbit.model import kernels
from lowbit.native import layout

KERNEL_MODES = ("auto", "reference")


def default_kernel_mode() -> str:
    mode = os.environ.get("LOWBIT_KERNELS", "auto")
    return mode if mode in KERNEL_MODES else "auto"


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self._names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.plan: kernels.KernelPlan | None = None  # set by prepare()
        self._packed: dict[str, torch.Tensor] = {}

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None) -> "QLinear":
        qt = quantize_tensor(weight, spec)
        return cls(weight.shape[1], weight.shape[0], spec, qt.tensors, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QLinear":
        return cls.from_weight(linear.weight.detach(), spec, linear.bias)

    # -- the stored form ---------------------------------------------------------------------------
    def _stored(self, name: str) -> torch.Tensor:
        if name == "qdata" and "qdata" not in self._buffers and self.plan.name == "int8dyn":
            # the codes kept beside the prepacked GEMM weight (else read back from it)
            return self._packed["w"] if "w" in self._packed else kernels.int8_codes(self._packed)
        if name == "qdata" and "qdata" not in self._buffers:  # int4pack holds the codes packed its own way
            codes = kernels.int4_codes(self._packed, self.out_features, self.in_features)
            if self.spec.symmetric:
                codes = codes - 8 + 2 ** (self.spec.bits - 1)  # kernel codes are q + 8; storage is q + 2**(b-1)
            return packing.pack(codes, self.spec.bits) if self.spec.bits < 8 else codes.to(torch.uint8)
        return getattr(self, name)

    def stored_meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a stored tensor, without rebuilding codes a kernel holds."""
        if name == "qdata" and "qdata" not in self._buffers:
            if self.plan.name == "int8dyn":
                return (self.out_features, self.in_features), torch.int8
            bits = self.spec.bits
            return (self.out_features, packing.packed_cols(self.in_features, bits) if bits < 8 else self.in_features), torch.uint8
        t = getattr(self, name)
        return tuple(t.shape), t.dtype

    def qtensor(self) -> QTensor:
        return QTensor(self.spec, (self.out_features, self.in_features), {n: self._stored(n) for n in self._names})

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "qdata" not in self._buffers and "qdata" in self._names:
            destination[prefix + "qdata"] = self._stored("qdata")

    @property
    def nbytes(self) -> int:
        """Bytes of the stored (artifact) form."""
        return self.qtensor().nbytes

    @property
    def memory_bytes(self) -> int:
        """Bytes this module holds in memory now (buffers, kernel tensors and bias; shared storage once)."""
        seen, total = set(), 0
        if "linear" in self._packed:  # a prepacked int8 GEMM weight: its codes plus one scale per row (the codes
            total += self.in_features * self.out_features + 8 * self.out_features  # kept beside it count below)
        tensors = [t for t in self._packed.values() if isinstance(t, torch.Tensor)]
        for t in [*self._buffers.values(), *tensors, *([self.bias] if self.bias is not None else [])]:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()  # a slice of a fused tensor counts its own rows only
        return total

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_tensor(self.qtensor(), dtype)

    # -- kernels -----------------------------------------------------------------------------------
    def prepare(self, kernel: str = "auto") -> kernels.KernelPlan:
        """Pick and build this module's kernel ("auto": the fastest that holds the format; "reference")."""
        if kernel not in KERNEL_MODES:
            raise ValueError(f"kernel must be one of {KERNEL_MODES}, got {kernel!r}")
        if self.plan is not None and "qdata" not in self._buffers and "qdata" in self._names:
            self.register_buffer("qdata", self._stored("qdata"))  # back to the stored form first
        self._packed = {}
        if kernel == "reference":
            self.plan = kernels.KernelPlan("reference", False, "reference path requested")
            return self.plan
        qt = self.qtensor()
        self.plan = kernels.plan_kernel(qt)
        self._packed = kernels.pack(qt, self.plan)
        if self.plan.name in ("int4pack", "int8dyn"):  # the kernel's copy replaces the stored codes in memory
            del self._buffers["qdata"]
        return self.plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            plan = self.prepare(default_kernel_mode())
            if not plan.fast and plan.name != "reference":
                warnings.warn(f"lowbit: a {self.spec.label} layer ({self.in_features}->{self.out_features}) has no fast "
                              f"CPU kernel and runs dequantize-then-matmul: {plan.reason}", stacklevel=2)
        if self.plan.name == "reference":
            return self._forward_reference(x)
        return kernels.run(self.plan, self._packed, self.qtensor, x, self.bias, self.out_features,
                           self.spec.activation, getattr(self, "input_scale", None))

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activation != "none":
            y = self._int8_reference(x.reshape(-1, self.in_features).float())
            if self.bias is not None:
                y = y + self.bias.float()
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _int8_reference(self, x2: torch.Tensor) -> torch.Tensor:
        """int8 activations (per token, or the calibrated static scale) x int8 weights, accumulated in int32."""
        if self.spec.activation == "int8_static":
            sx = self.input_scale.float().reshape(1, 1)
        else:
            amax = x2.abs().amax(dim=-1, keepdim=True)  # (tokens, 1)
            sx = range_scale(amax, 127)
        xq = quantize_symmetric_int8(x2, sx)
        return torch._int_mm(xq, self.qdata.t()).float() * sx * self.scale.float().reshape(1, -1)

    def extra_repr(self) -> str:
        kernel = "" if self.plan is None else f", kernel={self.plan.name}"
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.label}, bias={self.bias is not None}{kernel}"


def prepare_model(model: nn.Module, kernel: str | None = None, warn: bool = True) -> dict[str, kernels.KernelPlan]:
    """Pick every QLinear's kernel. Modules left without a fast kernel are named in one warning."""
    kernel = kernel or default_kernel_mode()
    plans = {name: m.prepare(kernel) for name, m in model.named_modules() if isinstance(m, QLinear)}
    slow = defaultdict(list)
    for name, plan in plans.items():
        if not plan.fast and plan.name != "reference":
            slow[plan.reason].append(name)
    if warn and slow:
        lines = [f"{len(names)} module(s) [{_names_hint(names)}]: {reason}" for reason, names in slow.items()]
        warnings.warn("lowbit: no fast CPU kernel, these run dequantize-then-matmul in bf16:\n  " + "\n  ".join(lines),
                      stacklevel=2)
    return plans


class FusedQLinear:
    """QLinears that read the same input (q/k/v, gate/up), run as one kernel call.

    The kernel weights are concatenated along the output rows once, and each module's own kernel
    weight becomes a slice of the concatenation, so memory is not doubled and the modules still run
    (and save) on their own. `fuse` returns None when the modules cannot share a call: different
    formats or kernels, a bias, or different act-order permutations."""

    KERNELS = ("int4pack", "int8pack")

    def __init__(self, mods: list[QLinear], packed: dict[str, torch.Tensor]) -> None:
        self.mods, self.packed = mods, packed
        self.plan = mods[0].plan
        self.sizes = [m.out_features for m in mods]
        self.out_features = sum(self.sizes)

    @classmethod
    def fuse(cls, mods: list[QLinear]) -> "FusedQLinear | None":
        if len(mods) < 2 or not all(isinstance(m, QLinear) and m.plan is not None for m in mods):
            return None
        p0 = mods[0].plan
        if not native.available() or (p0.name == "int4pack" and not kernels.native_layout(mods[0]._packed)):
            return None  # only lowbit's own layouts are concatenated (torch's packing is its own business)
        if p0.name not in cls.KERNELS or any(m.plan != p0 or m.spec != mods[0].spec or m.bias is not None
                                             or m.in_features != mods[0].in_features for m in mods):
            return None
        perms = [m._packed.get("perm") for m in mods]
        if any((p is None) != (perms[0] is None) or (p is not None and not torch.equal(p, perms[0])) for p in perms):
            return None
        if p0.name == "int4pack" and len({m._packed["p"].dtype for m in mods}) > 1:
            return None  # float16 params in one module, float32 in another
        w = torch.cat([m._packed["w"] for m in mods])
        packed = {"w": w}
        if p0.name == "int8pack":
            packed["s"] = torch.cat([m._packed["s"] for m in mods])
        else:  # q4: row blocks of 32, so each module's rows are a run of blocks in both tensors
            packed["p"] = torch.cat([m._packed["p"] for m in mods])
        if perms[0] is not None:
            packed["perm"] = perms[0]
        start, unit = 0, cls._unit(p0)
        for m in mods:  # each module's weight becomes its rows of the concatenation
            a, b = start // unit, (start + m.out_features) // unit
            m._packed["w"] = w[a:b]
            if p0.name == "int8pack":  # int8pack's weight is the stored codes themselves: share them too
                m._packed["s"] = packed["s"][a:b]
                m._buffers["qdata"] = m._packed["w"]
            else:
                m._packed["p"] = packed["p"][a:b]
            start += m.out_features
        return cls(mods, packed)

    @staticmethod
    def _unit(plan) -> int:
        """Output rows per index of the kernel weight's first dimension (q4: blocks of 32 rows)."""
        return layout.ROWS if plan.name == "int4pack" else 1

    def current(self) -> bool:
        """False once a module was re-prepared (its kernel weight is no longer a slice of ours)."""
        w = self.packed["w"]
        row = w.stride(0) * w.element_size()
        start, unit = 0, self._unit(self.plan)
        for m, n in zip(self.mods, self.sizes):
            if m.plan != self.plan or m._packed.get("w") is None \
                    or m._packed["w"].data_ptr() != w.data_ptr() + start // unit * row:
                return False
            start += n
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = kernels.run(self.plan, self.packed, None, x, None, self.out_features)
        return list(y.split(self.sizes, dim=-1))


def fused(owner: nn.Module, names: tuple[str, ...]) -> FusedQLinear | None:
    """The FusedQLinear of owner's submodules `names` (built once and kept on the owner), or None."""
    key = "_lowbit_fused_" + "_".join(names)
    f = owner.__dict__.get(key)
    if f is not None and f.current():
        return f
    f = FusedQLinear.fuse([getattr(owner, n) for n in names])
    owner.__dict__[key] = f
    return f


def _names_hint(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def kernel_summary(plans: dict[str, kernels.KernelPlan]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for p in plans.values():
        counts[p.name] += 1
    return dict(counts)


class QEmbedding(nn.Module):
    """Embedding lookups read from a tied, quantized output head: one matrix, stored and held once.

    Tied models (SmolLM2, Gemma 3) use the embedding table as the output head. When the head is
    quantized to a per-row format (INT8 or FP8, one scale per row), a token's embedding is its row
    of the head, dequantized on lookup, so the float table need not be kept beside it. The head is
    referenced, not registered, so its tensors are saved once, under the head's name.
    """

    def __init__(self, head: QLinear, dtype: torch.dtype, embed_scale: float | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        if not self.supports(head.spec):
            raise ValueError(f"QEmbedding needs a per-row head format, got {head.spec.label}")
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype, self.embed_scale, self.padding_idx = dtype, embed_scale, padding_idx

    @staticmethod
    def supports(spec: QuantSpec) -> bool:
        return (spec.granularity == "channel" and spec.activation == "none"
                and ((spec.kind == "int" and spec.bits == 8 and spec.symmetric) or spec.kind.startswith("fp8")))

    @classmethod
    def replacing(cls, embedding: nn.Module, head: QLinear) -> "QEmbedding":
        """Built to stand in for `embedding` (keeps its dtype and, for Gemma-style scaled embeddings, its scale)."""
        scale = getattr(embedding, "embed_scale", None)
        scale = float(scale) if scale is not None and not (isinstance(scale, torch.Tensor) and scale.is_meta) else None
        return cls(head, embedding.weight.dtype, scale, getattr(embedding, "padding_idx", None))

    @property
    def weight(self) -> torch.Tensor:  # what code that inspects model.get_input_embeddings().weight sees
        return self.head.dequantized_weight(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head
        rows = h.qdata[ids].float() * h.scale.float().reshape(-1)[ids].unsqueeze(-1)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized head ({self.head.spec.label})"


def share_embedding(model: nn.Module) -> bool:
    """If the model's output head is tied to its embeddings and now a per-row QLinear, make the
    embedding read from it. Returns whether it did (the artifact records it as embedding: lm_head)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, QLinear) or not QEmbedding.supports(head.spec):
        return False
    model.set_input_embeddings(QEmbedding.replacing(model.get_input_embeddings(), head))
    return True
