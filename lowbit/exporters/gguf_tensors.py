"""The tensors a GGUF holds, read off a lowbit model, with llama.cpp's names and row order.

Only llama.cpp's "llama" layout is written (Llama, SmolLM, Mistral-style models). Names come from
gguf-py's TensorNameMap; q/k projection rows are permuted from Hugging Face's rotary order into
llama.cpp's. The permutation moves whole rows, so blocks packed from lowbit's codes stay exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError

SUPPORTED_ARCHS = ("LlamaForCausalLM",)


def check_arch(model: nn.Module) -> None:
    """A LowbitError unless the model is an architecture the writer lays out."""
    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise LowbitError(
            f"GGUF export: architecture {archs[0]} is not supported (lowbit writes the llama.cpp 'llama' layout for "
            f"{', '.join(SUPPORTED_ARCHS)}); fix: export it with --format compressed-tensors or lowbit's native format")


def permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary (half-split) order -> llama.cpp's (interleaved) order, on the output rows."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def maybe_permute(x: torch.Tensor, hf_name: str, config) -> torch.Tensor:
    """x in llama.cpp's row order: q/k projections (weights, or blocks of them, and biases) permuted, others as is."""
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        return permute_rows(x, config.num_attention_heads)
    if hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        return permute_rows(x, config.num_key_value_heads)
    return x


def model_weights(model: nn.Module):
    """(hf name, tensor or QLinear) for every tensor the GGUF holds; tied copies once."""
    from lowbit.model.qlinear import QEmbedding, QLinear

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    emb = model.get_input_embeddings()
    if isinstance(emb, QEmbedding):
        # the embedding table is the quantized head's rows: GGUF holds it once as token_embd, and
        # llama.cpp reads the output head from token_embd when output.weight is absent
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        yield emb_name + ".weight", emb.head
        head_owner = next(n for n, m in qmods.items() if m is emb.head)
        qmods = {n: m for n, m in qmods.items() if m is not emb.head}
        tied = True
    else:
        head_owner = None
    seen = set()
    for name, t in model.state_dict().items():
        owner, _, attr = name.rpartition(".")
        if owner == head_owner:
            continue
        if owner in qmods:
            if attr == "qdata":
                yield owner + ".weight", qmods[owner]
            elif attr == "bias":
                yield name, t
            continue
        if tied and name == "lm_head.weight":
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen or not t.is_floating_point():
            continue
        seen.add(key)
        yield name, t


def imatrix_by_gguf_name(imatrix: dict[str, torch.Tensor] | None, n_blocks: int) -> dict[str, np.ndarray]:
    """lowbit's importance matrix (module name -> mean x**2 per input channel) keyed by GGUF tensor name."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    if not imatrix:
        return {}
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks)
    out = {}
    for module, v in imatrix.items():
        g = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if g is not None:
            out[g] = v.float().numpy().astype(np.float32)
    return out
