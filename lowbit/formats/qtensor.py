"""QTensor: a quantized 2-D weight as plain tensors (what is stored) plus its spec and shape.

`quantize_tensor` and `dequantize_tensor` dispatch on the spec's kind; the stored tensors are
named so that an artifact is self-describing:

    int   qdata (packed uint8, or int8/uint8 at 8 bits), scale, [zero_point | offset], [perm]
    nf4   qdata (packed uint8 codes), absmax  |  absmax_q, absmax_scale, absmax_mean (double quant)
    fp8   qdata (float8), scale

`zero_point` (uint8) is the int zero domain, `offset` (float) the float zero domain. `perm` (int32,
optional, from GPTQ act-order) says the stored columns are a permutation of the weight's: stored
column j is input column perm[j], groups run along the stored order. A matmul then reads
x[..., perm] against the stored weight, so the act-order artifact runs as fast as a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import affine, fp8, nf4, packing
from lowbit.formats.spec import QuantSpec


@dataclass
class QTensor:
    spec: QuantSpec
    shape: tuple[int, int]  # (out_features, in_features) of the original weight
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    return w


def int_qtensor(spec: QuantSpec, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                perm: torch.Tensor | None = None) -> QTensor:
    """Assemble an int QTensor from codes as affine.quantize returns them (int8 symmetric, uint8
    asymmetric; in stored column order when perm is given), packing sub-byte widths."""
    rows, cols = q.shape
    if spec.bits < 8:
        shift = 0 if zero is not None else 2 ** (spec.bits - 1)  # signed -> unsigned for packing
        q = packing.pack(q.to(torch.int32) + shift, spec.bits)
    else:
        q = q.to(torch.int8 if spec.symmetric else torch.uint8)
    out = {"qdata": q, "scale": scale}
    if zero is not None:
        out["offset" if zero.is_floating_point() else "zero_point"] = zero
    if perm is not None:
        out["perm"] = perm.to(torch.int32)
    return QTensor(spec, (rows, cols), out)


def int_codes(qt: QTensor) -> torch.Tensor:
    """The integer codes of an int QTensor, (rows, cols) in stored column order, as affine.dequantize takes them."""
    q = qt.tensors["qdata"]
    if qt.spec.bits < 8:
        q = packing.unpack(q, qt.spec.bits, qt.shape[1]).to(torch.int16)
        if qt.spec.symmetric:
            q = q - 2 ** (qt.spec.bits - 1)
    return q


def zero_of(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return tensors.get("zero_point", tensors.get("offset"))


def _quantize_int(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    scale, zero = affine.choose_qparams(w, spec)
    return int_qtensor(spec, affine.quantize(w, scale, zero, spec), scale, zero)


def _dequantize_int(qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
    t = qt.tensors
    w = affine.dequantize(int_codes(qt), t["scale"], zero_of(t), qt.spec, dtype)
    if "perm" in t:  # back to the input order: stored column j is input column perm[j]
        out = torch.empty_like(w)
        out[:, t["perm"].long()] = w
        return out
    return w


def _quantize_nf4(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    absmax = affine.as_groups(w.float(), spec).abs().amax(dim=-1)  # (rows, n_groups)
    if spec.double_quant:
        aq, ascale, amean = nf4.double_quantize(absmax)
        absmax = nf4.double_dequantize(aq, ascale, amean, tuple(absmax.shape))
        stored = {"absmax_q": aq, "absmax_scale": ascale, "absmax_mean": amean}
    else:
        stored = {"absmax": absmax}
    codes = nf4.quantize(w, absmax, spec)
    return QTensor(spec, tuple(w.shape), {"qdata": packing.pack(codes, 4), **stored})


def _dequantize_nf4(qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
    spec, t = qt.spec, qt.tensors
    rows, cols = qt.shape
    codes = packing.unpack(t["qdata"], 4, cols)
    if spec.double_quant:
        absmax = nf4.double_dequantize(t["absmax_q"], t["absmax_scale"], t["absmax_mean"], (rows, cols // spec.group_size))
    else:
        absmax = t["absmax"]
    return nf4.dequantize(codes, absmax, spec, dtype)


def _quantize_fp8(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    scale = fp8.choose_scale(w, spec)
    return QTensor(spec, tuple(w.shape), {"qdata": fp8.quantize(w, scale, spec), "scale": scale})


def _dequantize_fp8(qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
    return fp8.dequantize(qt.tensors["qdata"], qt.tensors["scale"], qt.spec, dtype)


# kind -> (quantize a 2-D weight, dequantize a QTensor): the one dispatch on the format kind
CODECS = {
    "int": (_quantize_int, _dequantize_int),
    "nf4": (_quantize_nf4, _dequantize_nf4),
    "fp8_e4m3": (_quantize_fp8, _dequantize_fp8),
    "fp8_e5m2": (_quantize_fp8, _dequantize_fp8),
}


def quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    return CODECS[spec.kind][0](_as_2d(w).detach(), spec)


def dequantize_tensor(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return CODECS[qt.spec.kind][1](qt, dtype)


def qdq(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize: what the model will compute with, in w's dtype."""
    if spec.kind == "int":  # the same rounding without packing the codes only to unpack them
        w = _as_2d(w).detach()
        scale, zero = affine.choose_qparams(w, spec)
        return affine.dequantize(affine.quantize(w, scale, zero, spec), scale, zero, spec, w.dtype)
    return dequantize_tensor(quantize_tensor(w, spec), w.dtype)


def stored_layout(spec: QuantSpec, rows: int, cols: int) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]],
                                                                  dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """What quantize_tensor stores for a (rows, cols) weight: ({required name: (shape, dtype)},
    {optional name: (shape, dtype)}), so a file's tensors can be checked against their spec before
    any of them is used."""
    if spec.granularity == "tensor":
        groups = (1, 1)
    elif spec.granularity == "channel":
        groups = (rows, 1)
    else:
        groups = (rows, cols // spec.group_size)
    optional = {}
    if spec.kind == "int":
        sdt = affine.torch_dtype(spec.scale_dtype)
        if spec.bits < 8:
            qdata = ((rows, packing.packed_cols(cols, spec.bits)), torch.uint8)
        else:
            qdata = ((rows, cols), torch.int8 if spec.symmetric else torch.uint8)
        need = {"qdata": qdata, "scale": (groups, sdt)}
        if not spec.symmetric:
            need["offset" if spec.zero_domain == "float" else "zero_point"] = (groups, sdt if spec.zero_domain == "float"
                                                                              else torch.uint8)
        optional["perm"] = ((cols,), torch.int32)
        if spec.activation == "int8_static":
            need["input_scale"] = ((), torch.float32)
        return need, optional
    if spec.kind == "nf4":
        need = {"qdata": ((rows, packing.packed_cols(cols, 4)), torch.uint8)}
        if spec.double_quant:
            blocks = -(-(groups[0] * groups[1]) // nf4.DQ_BLOCK)
            need.update(absmax_q=((blocks, nf4.DQ_BLOCK), torch.int8), absmax_scale=((blocks,), torch.float32),
                        absmax_mean=((1,), torch.float32))
        else:
            need["absmax"] = (groups, torch.float32)
        return need, optional
    return {"qdata": ((rows, cols), fp8.DTYPES[spec.kind]), "scale": (groups, torch.float32)}, optional
