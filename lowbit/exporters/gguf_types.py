"""Which GGUF tensor type each weight gets, and a float weight encoded as a given type.

The type names lowbit accepts (`--type`), the lowbit schemes whose storage already is a GGUF block
type (written from their codes; the block math is lowbit.formats.ggml), the type `--type auto`
requantizes every other scheme to, and the refusals for schemes GGUF cannot hold.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats import ggml

# gguf-py can write these itself; K-quants and IQ types go through llama.cpp.
PY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
LLAMA_CPP_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL")
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
ALL_TYPES = ("auto", *PY_TYPES, *LLAMA_CPP_TYPES)


def normalize_type(gguf_type: str) -> str:
    """A --type value as lowbit's canonical name ('auto' or an upper-case GGUF type), or a LowbitError."""
    t = ALIASES.get(gguf_type.upper(), gguf_type.upper())
    if t == "AUTO":
        return "auto"
    if t not in ALL_TYPES:
        raise LowbitError(f"--type '{gguf_type}': not a GGUF type lowbit writes; use one of {', '.join(ALL_TYPES)} "
                          f"(Q4_K and Q5_K mean Q4_K_M and Q5_K_M)")
    return t


def quantize_as(w: torch.Tensor, type_name: str) -> tuple[np.ndarray, object]:
    """A float weight as a GGUF tensor of type_name: (numpy array for GGUFWriter.add_tensor, raw dtype).

    Q8_0/Q5_0/Q5_1/Q4_0/Q4_1 by lowbit's ggml-exact quantizers (same bytes as gguf-py's), the other quantized
    types by gguf-py's quants module."""
    from gguf import GGMLQuantizationType, quants

    if type_name == "F32":
        return w.float().contiguous().numpy(), None
    if type_name == "F16":
        return w.to(torch.float16).contiguous().numpy(), None
    qt = GGMLQuantizationType[type_name]
    if type_name in ggml.QUANTIZERS:
        return ggml.QUANTIZERS[type_name](w).numpy(), qt
    return quants.quantize(w.float().contiguous().numpy(), qt), qt


def exact_blocks(qlin) -> tuple[str, torch.Tensor] | None:
    """(type, blocks) when the QLinear's storage is a GGUF type bit for bit, else None."""
    if "perm" in qlin._names or ggml.exact_type(qlin.spec, qlin.in_features) is None:
        return None  # decided from the spec before reading any stored tensor
    return ggml.blocks_from_qtensor(qlin.qtensor())


def nearest_type(spec, module: str) -> str:
    """The GGUF type --type auto requantizes a scheme to, or a LowbitError naming the nearest choices."""
    if spec.kind == "nf4":
        raise LowbitError(
            f"module {module}: scheme '{spec.label}' (NF4, a non-uniform 4-bit codebook) has no GGUF equivalent; "
            f"fix: pass --type with one of the nearest types to requantize from the dequantized weights: "
            f"Q4_K_M, Q4_1, Q4_0 or IQ4_NL (llama.cpp's non-uniform 4-bit type)")
    if spec.kind.startswith("fp8"):
        raise LowbitError(
            f"module {module}: scheme '{spec.label}' (FP8) has no GGUF equivalent; fix: pass --type with one of the "
            f"nearest types: Q8_0, F16 or BF16; or export it with --format compressed-tensors, which holds FP8")
    if spec.bits in (2, 3):
        raise LowbitError(
            f"module {module}: scheme '{spec.label}' ({spec.bits}-bit int) has no GGUF type gguf-py can write; "
            f"fix: pass --type with one of the nearest types: {'Q3_K_M or Q2_K' if spec.bits == 3 else 'Q2_K or Q3_K_M'} "
            f"(quantized by llama.cpp), or Q4_0")
    if spec.bits == 4:
        return "Q4_0" if spec.symmetric else "Q4_1"
    if spec.bits == 5:
        return "Q5_0" if spec.symmetric else "Q5_1"
    return "Q8_0"
