"""GGUF export for llama.cpp: a lowbit model (quantized or float) to one .gguf file.

Tensor types, per quantized linear weight:

    --type auto        each lowbit scheme to its closest GGUF type. Exact mappings are written block
                       for block from lowbit's own codes and scales, without requantizing:
                         int8 sym  g32 fp16 scales      == Q8_0   (x = d * q)
                         int4 sym  g32 fp16 scales      == Q4_0   (x = d * (q' - 8), q' = q + 8)
                         int4 asym-f g32 fp16 scales    == Q4_1   (x = d * q + m)
                       Other int schemes are requantized (from lowbit's dequantized weight) to the
                       nearest type (8 bits -> Q8_0, 5 -> Q5_0/Q5_1, 6-7 -> Q8_0, 4 -> Q4_0/Q4_1),
                       and the export says so. NF4, FP8 and 2-3 bit ints have no GGUF equivalent a
                       Python writer can produce: they are refused with the nearest types listed.
    --type F32|F16|BF16|Q8_0|Q5_0|Q5_1|Q4_0|Q4_1
                       every quantized linear requantized to that type from its dequantized weight
                       (a float model with no quantized module: every linear weight but a tied head)
                       (Q8_0/Q4_0/Q4_1 by lowbit's ggml-exact quantizer, byte-identical to gguf-py's;
                       Q5_0/Q5_1/BF16 by gguf-py's quants module).
    --type Q4_K_M|Q4_K_S|Q5_K_M|Q5_K_S|Q6_K|Q3_K_M|Q2_K|IQ4_NL
                       K-quants, which gguf-py cannot produce: an F32 GGUF of the dequantized model
                       is written and quantized by llama.cpp itself (llama-cpp-python's
                       llama_model_quantize), with the artifact's calibration importance matrix
                       passed as llama.cpp's imatrix. llama.cpp's own mix decides each tensor's
                       type (sensitive tensors such as attn_v/ffn_down kept higher in *_M mixes);
                       rows not divisible by 256 (SmolLM2's 576-wide rows) fall back to llama.cpp's
                       legacy types (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), as llama.cpp does.

Everything lowbit kept in high precision (embeddings, norms, an ignored lm_head) is written as F16
(2-D) or F32 (1-D) for the gguf-py types. Only the Llama architecture is written (llama.cpp's
"llama": Llama, SmolLM, Mistral-style models); q/k rows are permuted into llama.cpp's rotary layout.
The tokenizer (vocabulary, merges, special ids, chat template) is copied from the source GGUF when
the model came from one, otherwise built from the Hugging Face tokenizer files with gguf-py's vocab
helpers. The file is written under a temporary name and renamed into place.

This module plans and writes the file; the parts live beside it:
    lowbit.formats.ggml    Q8_0/Q4_0/Q4_1 block layouts, packing and ggml's reference quantizers
    gguf_types.py          --type names, scheme -> GGUF type (exact or nearest), a weight encoded as a type
    gguf_tensors.py        the tensors a model holds, their llama.cpp names and rotary row order
    gguf_vocab.py          the tokenizer key/values
The names other code imports from here (write_gguf, GGUFExport, normalize_type, nearest_type,
SUPPORTED_ARCHS, source_gguf, imatrix_by_gguf_name, ...) are re-exported below.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.exporters.gguf_tensors import SUPPORTED_ARCHS, check_arch, imatrix_by_gguf_name, maybe_permute, model_weights
from lowbit.exporters.gguf_types import (ALIASES, ALL_TYPES, LLAMA_CPP_TYPES, PY_TYPES, exact_blocks, nearest_type,
                                      normalize_type, quantize_as)
from lowbit.exporters.gguf_vocab import add_tokenizer_kvs, source_gguf
from lowbit.model.artifact import move_into_place, output_lock, prepare_out_file, temp_beside
from lowbit.formats.ggml import (BLOCK, pack_q4_0, pack_q4_1, pack_q8_0, quantize_q4_0, quantize_q4_1,
                                 quantize_q8_0)

# the names this module has always offered, wherever they are defined now
__all__ = [
    "ALIASES", "ALL_TYPES", "BLOCK", "GGUFExport", "LLAMA_CPP_TYPES", "PY_TYPES", "SUPPORTED_ARCHS", "exact_blocks",
    "imatrix_by_gguf_name", "nearest_type", "normalize_type", "pack_q4_0", "pack_q4_1", "pack_q8_0", "quantize_as",
    "quantize_q4_0", "quantize_q4_1", "quantize_q8_0", "source_gguf", "write_gguf",
]


@dataclass
class GGUFExport:
    """What write_gguf wrote: the file, the type asked for, each tensor's type, and notes for the user."""
    path: Path
    gguf_type: str
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name
    notes: list[str] = field(default_factory=list)
    exact: int = 0  # quantized weights written block for block from lowbit codes
    requantized: int = 0  # quantized weights requantized from lowbit's dequantized weights

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _hparams(writer, config, file_type: int) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise LowbitError(f"GGUF export: rope_type '{rope.get('rope_type')}' is not written by lowbit; only plain RoPE")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _atomic_target(out: Path, force: bool = True) -> Path:
    """Check out (see lowbit.model.artifact.prepare_out_file: not a folder, a link, '.', ...), take the
    writer's lock on it, remove dead runs' temporaries beside it, and return a fresh temporary path
    there, named after this process."""
    prepare_out_file(Path(out), force)
    return temp_beside(Path(out))


def write_gguf(model: nn.Module, out: str | Path, gguf_type: str = "auto", source: dict | None = None,
               folder: Path | None = None, imatrix: dict[str, torch.Tensor] | None = None,
               name: str | None = None, progress=None, force: bool = True) -> GGUFExport:
    """Write model as a GGUF file (see the module docstring for the type rules). The file is written
    under a temporary name beside out, under the writer's lock on out, and renamed into place; an
    existing out is replaced only with force (lowbit.export passes --force; here True, as always)."""
    gguf_type = normalize_type(gguf_type)
    out = Path(out)
    check_arch(model)
    with output_lock(out, force, "output file"):
        if gguf_type in LLAMA_CPP_TYPES:
            return _via_llama_cpp(model, out, gguf_type, source, folder, imatrix, name, progress, force)
        return _write_gguf(model, out, gguf_type, source, folder, name, progress, force)


def _write_gguf(model, out: Path, gguf_type: str, source, folder, name, progress, force: bool) -> GGUFExport:
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_ARCH, get_tensor_name_map

    from lowbit.model.qlinear import QLinear

    config = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    notes: list[str] = []
    # plan every tensor first: a scheme GGUF cannot hold fails before anything is written
    plan = []
    float_model = not any(isinstance(m, QLinear) for m in model.modules())
    linear_weights = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for hf_name, t in model_weights(model):
        g_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g_name is None:
            raise LowbitError(f"GGUF export: tensor {hf_name} has no llama.cpp name; this model layout is not supported")
        if isinstance(t, QLinear):
            ex = exact_blocks(t)
            if ex is not None and gguf_type in ("auto", ex[0]):
                kind = ("exact", ex)
            else:
                kind = ("requant", gguf_type if gguf_type != "auto" else nearest_type(t.spec, hf_name.rpartition(".")[0]))
        elif float_model and gguf_type != "auto" and hf_name in linear_weights:
            kind = ("float", gguf_type)  # a float model: every linear weight to the requested type
        else:
            kind = ("float", "F32" if t.ndim == 1 or gguf_type == "F32" else "F16")
        plan.append((hf_name, g_name, t, kind))
    tmp = _atomic_target(out, force)
    file_type = {"auto": LlamaFileType.GUESSED, "F32": LlamaFileType.ALL_F32}.get(
        gguf_type, LlamaFileType[f"MOSTLY_{gguf_type}"] if f"MOSTLY_{gguf_type}" in LlamaFileType.__members__
        else LlamaFileType.GUESSED)
    result = GGUFExport(out, gguf_type, {}, notes)
    writer = GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or (source or {}).get("name", "lowbit export"))
        _hparams(writer, config, int(file_type))
        add_tokenizer_kvs(writer, source_gguf(source), folder, config.vocab_size, notes)
        requant_from: dict[str, list[str]] = {}
        for i, (hf_name, g_name, t, (how, what)) in enumerate(plan):
            if progress:
                progress(g_name, i, len(plan))
            if how == "exact":
                type_name, blocks = what
                arr = maybe_permute(blocks, hf_name, config).numpy()
                raw = GGMLQuantizationType[type_name]
                result.exact += 1
            else:
                w = t.dequantized_weight(torch.float32) if isinstance(t, QLinear) else t.detach().float()
                if how == "requant":
                    requant_from.setdefault(f"{t.spec.label} -> {what}", []).append(hf_name)
                    result.requantized += 1
                type_name = what
                arr, raw = quantize_as(maybe_permute(w, hf_name, config), type_name)
            writer.add_tensor(g_name, np.ascontiguousarray(arr), raw_dtype=raw)
            result.tensor_types[g_name] = type_name
        for what, mods in requant_from.items():
            notes.append(f"requantized (no exact GGUF equivalent) {what}: {len(mods)} module(s), e.g. {mods[0]}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        move_into_place(tmp, out, force)  # refuses an out that appeared meanwhile, unless force
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return result


def _via_llama_cpp(model, out, gguf_type, source, folder, imatrix, name, progress, force=True) -> GGUFExport:
    from lowbit.exporters import llamacpp

    prepare_out_file(out, force)
    f32 = temp_beside(out, ".f32.gguf")  # both temporaries carry this process's name (stale ones are removed)
    quantized = temp_beside(out, ".gguf")
    try:
        base = write_gguf(model, f32, "F32", source, folder, None, name, progress)  # its own lock, released
        imx = {k: v for k, v in imatrix_by_gguf_name(imatrix, model.config.num_hidden_layers).items()
               if k in base.tensor_types}  # e.g. no output.weight when the head is tied
        types = llamacpp.quantize(f32, quantized, gguf_type, imatrix=imx or None)
        move_into_place(quantized, out, force)
    finally:
        for t in (f32, quantized):
            if t.exists():
                t.unlink()
    notes = [n for n in base.notes if not n.startswith("requantized")]
    notes.append(f"quantized by llama.cpp ({gguf_type}) from the F32 dequantization of the model"
                 + (f", with lowbit's importance matrix for {len(imx)} tensors" if imx else ", without an importance matrix"))
    counts = Counter(types.values())
    notes.append("llama.cpp chose: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
    res = GGUFExport(out, gguf_type, types, notes)
    res.requantized = base.requantized
    return res
