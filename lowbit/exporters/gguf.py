"""GGUF export for llama.cpp: a lowbit model (quantized or float) to one .gguf file.

Tensor types, per quantized linear weight:

    --type auto        each lowbit scheme to its closest GGUF type. Exact mappings are written block
                       for block from lowbit's own codes and scales, without requantizing:
                         int8 sym  g32 fp16 scales      == Q8_0   (x = d * q)
                         int5 sym  g32 fp16 scales      == Q5_0   (x = d * (q' - 16), q' = q + 16)
                         int5 asym-f g32 fp16 scales    == Q5_1   (x = d * q + m)
                         int4 sym  g32 fp16 scales      == Q4_0   (x = d * (q' - 8), q' = q + 8)
                         int4 asym-f g32 fp16 scales    == Q4_1   (x = d * q + m)
                       Other int schemes are quantized again to the nearest type (8 bits -> Q8_0,
                       5 -> Q5_0/Q5_1, 6-7 -> Q8_0, 4 -> Q4_0/Q4_1), and the export says so. NF4,
                       FP8 and 2-3 bit ints have no GGUF equivalent a Python writer can produce: they
                       are refused with the nearest types listed.
    --type F32|F16|BF16|Q8_0|Q5_0|Q5_1|Q4_0|Q4_1
                       every quantized linear to that type (a float model with no quantized module:
                       every linear weight but a tied head), modules already of that type block for
                       block (Q8_0/Q5_0/Q5_1/Q4_0/Q4_1 by lowbit's ggml-exact quantizers,
                       byte-identical to gguf-py's; BF16 by gguf-py's quants module). F32/F16/BF16
                       hold lowbit's dequantized weights.
    --type Q4_K_M|Q4_K_S|Q5_K_M|Q5_K_S|Q6_K|Q3_K_M|Q2_K|IQ4_NL
                       K-quants, which gguf-py cannot produce: an F32 GGUF is written and quantized
                       by llama.cpp itself (llama-cpp-python's llama_model_quantize), with the
                       artifact's calibration importance matrix passed as llama.cpp's imatrix.
                       llama.cpp's own mix decides each tensor's type (sensitive tensors such as
                       attn_v/ffn_down kept higher in *_M mixes); rows not divisible by 256
                       (SmolLM2's 576-wide rows) fall back to llama.cpp's legacy types
                       (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), as llama.cpp does.

Quantizing again, from what: a quantized module that is not written block for block (and, for
K-quants, the whole model) is quantized from the float model it came from when that is still at
hand: the source identity the model carries, or its artifact's lowbit.json records (path or bundled
name, and the sha256 of the weights), resolves to the same kind of model with the same sha256
(gguf_source.float_source_for). Then no weight is rounded twice: for K-quants the F32 GGUF is the
float model's, for the gguf-py types every tensor that is not an exact block is read from the float
model. Exact blocks stay beside float-sourced tensors only when the recorded algorithm quantized
each module on its own (rtn, rtn-mse, gptq); after AWQ / SmoothQuant, which move scales between
modules and into the norms, a model with exact blocks keeps requantizing its codes. Otherwise
(no source recorded, not found, changed, no sha256 to check) lowbit's dequantized weights are
requantized, and the notes say what that costs. Either way the notes say which was done.
write_gguf(..., use_float_source=False) keeps to lowbit's own weights (what the artifact computes).
F32/F16/BF16 always hold lowbit's dequantized weights.

Everything lowbit kept in high precision (embeddings, norms, an ignored lm_head) is written as F16
(2-D) or F32 (1-D) for the gguf-py types. Only the Llama architecture is written (llama.cpp's
"llama": Llama, SmolLM, Mistral-style models); q/k rows are permuted into llama.cpp's rotary layout.
The tokenizer (vocabulary, merges, special ids, chat template) is copied from the source GGUF when
the model came from one, otherwise built from the Hugging Face tokenizer files with gguf-py's vocab
helpers. The file is written under a temporary name and renamed into place.

This module plans and writes the file; the parts live beside it:
    lowbit.formats.ggml    Q8_0/Q5_0/Q5_1/Q4_0/Q4_1 block layouts, packing and ggml's reference quantizers
    gguf_types.py          --type names, scheme -> GGUF type (exact or nearest), a weight encoded as a type
    gguf_tensors.py        the tensors a model holds, their llama.cpp names and rotary row order
    gguf_vocab.py          the tokenizer key/values
    gguf_source.py         the float model a quantized one came from, when it can be read again unchanged
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
from lowbit.exporters.gguf_source import FloatSource, float_source_for, load_float_source
from lowbit.exporters.gguf_vocab import add_tokenizer_kvs, source_gguf
from lowbit.model.artifact import move_into_place, output_lock, prepare_out_file, temp_beside
from lowbit.formats.ggml import (BLOCK, pack_q4_0, pack_q4_1, pack_q5_0, pack_q5_1, pack_q8_0, quantize_q4_0,
                                 quantize_q4_1, quantize_q5_0, quantize_q5_1, quantize_q8_0)

# the names this module has always offered, wherever they are defined now
__all__ = [
    "ALIASES", "ALL_TYPES", "BLOCK", "FloatSource", "GGUFExport", "LLAMA_CPP_TYPES", "PY_TYPES", "SUPPORTED_ARCHS",
    "exact_blocks", "float_source_for", "imatrix_by_gguf_name", "nearest_type", "normalize_type", "pack_q4_0",
    "pack_q4_1", "pack_q5_0", "pack_q5_1", "pack_q8_0", "quantize_as", "quantize_q4_0", "quantize_q4_1",
    "quantize_q5_0", "quantize_q5_1", "quantize_q8_0", "source_gguf", "write_gguf",
]
FLOAT_TYPES = ("F32", "F16", "BF16")  # hold lowbit's dequantized weights as they are: never from the float source


@dataclass
class GGUFExport:
    """What write_gguf wrote: the file, the type asked for, each tensor's type, and notes for the user."""
    path: Path
    gguf_type: str
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name
    notes: list[str] = field(default_factory=list)
    exact: int = 0  # quantized weights written block for block from lowbit codes
    requantized: int = 0  # quantized weights not written from lowbit's codes (quantized again, from whichever input)
    from_float: int = 0  # of the requantized: quantized from the float source's weights, not lowbit's dequantized ones
    float_source: str | None = None  # the float source read (path or bundled name), when one was

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
               name: str | None = None, progress=None, force: bool = True,
               use_float_source: bool = True) -> GGUFExport:
    """Write model as a GGUF file (see the module docstring for the type rules). The file is written
    under a temporary name beside out, under the writer's lock on out, and renamed into place; an
    existing out is replaced only with force (lowbit.export passes --force; here True, as always).

    source / folder: the model's source identity and the folder its files are in (an artifact's
    lowbit.json there names the float source when source is None). use_float_source=False never reads
    the float source: weights that are not exact blocks are requantized from lowbit's own weights."""
    gguf_type = normalize_type(gguf_type)
    out = Path(out)
    check_arch(model)
    with output_lock(out, force, "output file"):
        if gguf_type in LLAMA_CPP_TYPES:
            return _via_llama_cpp(model, out, gguf_type, source, folder, imatrix, name, progress, force,
                                  use_float_source)
        return _write_gguf(model, out, gguf_type, source, folder, name, progress, force, use_float_source)


def _write_gguf(model, out: Path, gguf_type: str, source, folder, name, progress, force: bool,
                use_float_source: bool = True) -> GGUFExport:
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
    # what the tensors that are not exact blocks are read from (module docstring: "Quantizing again")
    fs, from_float = None, None
    if any(how == "requant" for *_, (how, _) in plan) and gguf_type not in FLOAT_TYPES:
        fs = float_source_for(source, folder) if use_float_source else FloatSource(None, "", "asked for: --from-codes / from_float=False")
        n_exact = sum(how == "exact" for *_, (how, _) in plan)
        if fs.usable and n_exact and not fs.per_module:
            fs = fs.refused(f"{n_exact} module(s) are written block for block beside them, and the recorded algorithm "
                            f"({fs.algorithm or 'unknown'}) may have moved scales between modules, so float weights "
                            f"cannot stand beside lowbit's blocks; a K-quant (--type Q4_K_M) reads the whole float model")
        if fs.usable:
            fs, from_float = _float_tensors(fs, plan)
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
        requant_specs = set()
        for i, (hf_name, g_name, t, (how, what)) in enumerate(plan):
            if progress:
                progress(g_name, i, len(plan))
            if how == "exact":
                type_name, blocks = what
                arr = maybe_permute(blocks, hf_name, config).numpy()
                raw = GGMLQuantizationType[type_name]
                result.exact += 1
            else:
                if from_float is not None:
                    w = from_float.pop(hf_name).detach().float()
                else:
                    w = t.dequantized_weight(torch.float32) if isinstance(t, QLinear) else t.detach().float()
                if how == "requant":
                    requant_from.setdefault(f"{t.spec.label} -> {what}", []).append(hf_name)
                    requant_specs.add(t.spec.label)
                    result.requantized += 1
                    result.from_float += from_float is not None
                type_name = what
                arr, raw = quantize_as(maybe_permute(w, hf_name, config), type_name)
                del w
            writer.add_tensor(g_name, np.ascontiguousarray(arr), raw_dtype=raw)
            result.tensor_types[g_name] = type_name
        from_float = None  # the float model's tensors not written are dropped here
        how_done = "quantized from the float source" if result.from_float else "requantized"
        for what, mods in requant_from.items():
            notes.append(f"{how_done} (no exact GGUF equivalent) {what}: {len(mods)} module(s), e.g. {mods[0]}")
        if result.from_float:
            result.float_source = fs.where
            notes.append(f"read from the float source {fs.where} (sha256 {fs.sha256[:12]}... checked): every tensor "
                         f"not written block for block, so no weight is rounded twice")
        elif fs is not None:
            notes.append(_codes_cost(sorted(requant_specs), fs))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        move_into_place(tmp, out, force)  # refuses an out that appeared meanwhile, unless force
    finally:
        writer.close()
        from_float = None
        if tmp.exists():
            tmp.unlink()
    return result


def _codes_cost(labels: list[str], fs: FloatSource) -> str:
    """The note for weights quantized a second time from lowbit's codes because the float model is not usable."""
    return (f"requantized from lowbit's {', '.join(labels)} codes, not from the float source ({fs.why_not}): "
            f"expect more error than quantizing the float model would give")


def _float_tensors(fs: FloatSource, plan) -> tuple[FloatSource, dict[str, torch.Tensor] | None]:
    """The float source's tensor for every planned tensor that is not an exact block (by Hugging Face
    name, same shape), or the source refused with the reason."""
    from lowbit.model.qlinear import QLinear
    from lowbit.model.skeleton import release_memory

    try:
        loaded = load_float_source(fs)
    except LowbitError as e:
        return fs.refused(f"{fs.where} could not be loaded ({str(e).split('; fix:')[0]})"), None
    state = loaded.module.state_dict()  # tied weights under each of their names
    del loaded
    found, bad = {}, None
    for hf_name, _, t, (how, _) in plan:
        if how == "exact":
            continue
        shape = (t.out_features, t.in_features) if isinstance(t, QLinear) else tuple(t.shape)
        f = state.get(hf_name)
        if f is None or tuple(f.shape) != shape or not f.is_floating_point():
            bad = f"its tensor {hf_name} is {'missing' if f is None else tuple(f.shape)}, the model's is {shape}"
            break
        found[hf_name] = f
    del state
    if bad is not None:
        found = None
        release_memory()
        return fs.refused(f"{fs.where} is not this model's float source: {bad}"), None
    return fs, found


def _via_llama_cpp(model, out, gguf_type, source, folder, imatrix, name, progress, force=True,
                   use_float_source: bool = True) -> GGUFExport:
    from lowbit.exporters import llamacpp
    from lowbit.model.qlinear import QLinear
    from lowbit.model.skeleton import release_memory

    prepare_out_file(out, force)
    specs = sorted({m.spec.label for m in model.modules() if isinstance(m, QLinear)})
    fs, float_model = None, None
    if specs:  # llama.cpp quantizes every weight again: from the float model when it is at hand
        fs = float_source_for(source, folder) if use_float_source else FloatSource(None, "", "asked for: --from-codes / from_float=False")
        if fs.usable:
            try:
                float_model = load_float_source(fs).module
            except LowbitError as e:
                fs = fs.refused(f"{fs.where} could not be loaded ({str(e).split('; fix:')[0]})")
    f32 = temp_beside(out, ".f32.gguf")  # both temporaries carry this process's name (stale ones are removed)
    quantized = temp_beside(out, ".gguf")
    try:
        try:  # its own lock, released
            base = write_gguf(float_model if float_model is not None else model, f32, "F32", source, folder, None,
                              name, progress)
        finally:
            float_model = None  # freed once its F32 GGUF is written
            release_memory()
        imx = {k: v for k, v in imatrix_by_gguf_name(imatrix, model.config.num_hidden_layers).items()
               if k in base.tensor_types}  # e.g. no output.weight when the head is tied
        types = llamacpp.quantize(f32, quantized, gguf_type, imatrix=imx or None)
        move_into_place(quantized, out, force)
    finally:
        for t in (f32, quantized):
            if t.exists():
                t.unlink()
    notes = [n for n in base.notes if not n.startswith("requantized")]
    with_imx = (f", with lowbit's importance matrix for {len(imx)} tensors" if imx
                else ", without an importance matrix")
    if not specs:
        notes.append(f"quantized by llama.cpp ({gguf_type}) from the F32 weights of the model" + with_imx)
    elif fs.usable:
        notes.append(f"quantized by llama.cpp ({gguf_type}) from the float source {fs.where} (sha256 {fs.sha256[:12]}... "
                     f"checked), not from lowbit's {', '.join(specs)} codes, so no weight is rounded twice" + with_imx)
    else:
        notes.append(f"quantized by llama.cpp ({gguf_type}) from the F32 dequantization of the model" + with_imx)
        notes.append(_codes_cost(specs, fs))
    counts = Counter(types.values())
    notes.append("llama.cpp chose: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
    res = GGUFExport(out, gguf_type, types, notes)
    if specs:  # llama.cpp quantized every one of lowbit's quantized weights again
        res.requantized = sum(isinstance(t, QLinear) for _, t in model_weights(model))
        if fs.usable:
            res.from_float, res.float_source = res.requantized, fs.where
    return res
