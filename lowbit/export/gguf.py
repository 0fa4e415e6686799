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
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError

# gguf-py can write these itself; K-quants and IQ types go through llama.cpp.
PY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
LLAMA_CPP_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL")
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
ALL_TYPES = ("auto", *PY_TYPES, *LLAMA_CPP_TYPES)
BLOCK = 32  # legacy GGUF block length along a row
SUPPORTED_ARCHS = ("LlamaForCausalLM",)


@dataclass
class GGUFExport:
    path: Path
    gguf_type: str
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name
    notes: list[str] = field(default_factory=list)
    exact: int = 0  # quantized weights written block for block from lowbit codes
    requantized: int = 0  # quantized weights requantized from lowbit's dequantized weights

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def normalize_type(gguf_type: str) -> str:
    t = ALIASES.get(gguf_type.upper(), gguf_type.upper())
    if t == "AUTO":
        return "auto"
    if t not in ALL_TYPES:
        raise LowbitError(f"--type '{gguf_type}': not a GGUF type lowbit writes; use one of {', '.join(ALL_TYPES)} "
                          f"(Q4_K and Q5_K mean Q4_K_M and Q5_K_M)")
    return t


# -- ggml's reference quantizers for the legacy blocks, in torch (byte-identical to gguf-py) --------
def _blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    if cols % BLOCK:
        raise LowbitError(f"GGUF export: row length {cols} is not a multiple of {BLOCK}; legacy GGUF blocks need it")
    return w.float().reshape(rows, cols // BLOCK, BLOCK)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round rounds halves to even)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(…, 32) codes 0..15 -> (…, 16) bytes: byte j holds code j (low) and code j+16 (high)."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) int8 and scales (rows, cols/32) -> (rows, cols/32*34) uint8 Q8_0 blocks."""
    rows = q.shape[0]
    qb = q.to(torch.int8).reshape(rows, -1, BLOCK).view(torch.uint8)
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), qb], dim=-1).reshape(rows, -1)


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) 0..15 (value = d * (code - 8)) -> Q4_0 blocks of 18 bytes."""
    rows = q.shape[0]
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), _nibbles(q.reshape(rows, -1, BLOCK))], dim=-1).reshape(rows, -1)


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) 0..15 (value = d * code + m) -> Q4_1 blocks of 20 bytes."""
    rows = q.shape[0]
    return torch.cat([_fp16_bytes(d.reshape(rows, -1, 1)), _fp16_bytes(m.reshape(rows, -1, 1)),
                      _nibbles(q.reshape(rows, -1, BLOCK))], dim=-1).reshape(rows, -1)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    b = _blocks(w)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return pack_q8_0(_roundf(b * inv).reshape(w.shape), d)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    b = _blocks(w)
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
    d = mx / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15)
    return pack_q4_0(q.reshape(w.shape), d)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    b = _blocks(w)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((b - lo) * inv + 0.5).clamp(0, 15)
    return pack_q4_1(q.reshape(w.shape), d, lo)


_TORCH_QUANT = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}


def quantize_as(w: torch.Tensor, type_name: str) -> tuple[np.ndarray, object]:
    """A float weight as a GGUF tensor of type_name: (numpy array for GGUFWriter.add_tensor, raw dtype)."""
    from gguf import GGMLQuantizationType, quants

    if type_name == "F32":
        return w.float().contiguous().numpy(), None
    if type_name == "F16":
        return w.to(torch.float16).contiguous().numpy(), None
    qt = GGMLQuantizationType[type_name]
    if type_name in _TORCH_QUANT:
        return _TORCH_QUANT[type_name](w).numpy(), qt
    return quants.quantize(w.float().contiguous().numpy(), qt), qt


# -- lowbit scheme -> GGUF type -------------------------------------------------------------------
def exact_blocks(qlin) -> tuple[str, torch.Tensor] | None:
    """(type, blocks) when the QLinear's storage is a GGUF type bit for bit, else None."""
    from lowbit.formats.qtensor import int_codes

    s = qlin.spec
    if (s.kind != "int" or s.granularity != "group" or s.group_size != BLOCK or s.scale_dtype != "float16"
            or "perm" in qlin._names or qlin.in_features % BLOCK):
        return None
    qt = qlin.qtensor()
    if s.bits == 8 and s.symmetric:
        return "Q8_0", pack_q8_0(int_codes(qt), qt.tensors["scale"])
    if s.bits == 4 and s.symmetric:
        return "Q4_0", pack_q4_0(int_codes(qt) + 8, qt.tensors["scale"])
    if s.bits == 4 and s.zero_domain == "float":
        return "Q4_1", pack_q4_1(int_codes(qt), qt.tensors["scale"], qt.tensors["offset"])
    return None


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


# -- model walking --------------------------------------------------------------------------------
def _arch_check(model: nn.Module) -> None:
    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise LowbitError(
            f"GGUF export: architecture {archs[0]} is not supported (lowbit writes the llama.cpp 'llama' layout for "
            f"{', '.join(SUPPORTED_ARCHS)}); fix: export it with --format compressed-tensors or lowbit's native format")


def _permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary (half-split) order -> llama.cpp's (interleaved) order, on the output rows."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def _weights(model: nn.Module):
    """(hf name, tensor or QLinear) for every tensor the GGUF holds; tied copies once."""
    from lowbit.model.qlinear import QLinear

    from lowbit.model.qlinear import QEmbedding

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


def source_gguf(source: dict | None) -> Path | None:
    """The GGUF file a model came from (bundled or .gguf source), if it still exists."""
    from lowbit.model import sources

    if not source:
        return None
    try:
        if source.get("kind") == "bundled":
            return sources.gguf_path(sources.resolve(source["name"]))
        if source.get("kind") == "gguf" and Path(source["path"]).is_file():
            return Path(source["path"])
    except LowbitError:
        return None
    return None


def _tokenizer_kvs(writer, gguf_src: Path | None, folder: Path | None, n_vocab: int, notes: list[str]) -> None:
    import gguf

    if gguf_src is not None:
        reader = gguf.GGUFReader(str(gguf_src))
        for key, f in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), vtype, sub)
        notes.append(f"tokenizer and chat template copied from {gguf_src.name}")
        return
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise LowbitError(f"GGUF export: no tokenizer.json in {folder} and no source GGUF to copy the vocabulary from; "
                          f"fix: save the tokenizer files into the artifact folder")
    vocab = gguf.vocab.BpeVocab(folder)
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer (padding), as llama.cpp's converter does
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    notes.append("tokenizer built from tokenizer.json with pre-tokenizer 'default' (llama.cpp may split text "
                  "slightly differently from transformers for some scripts)")


def _atomic_target(out: Path) -> Path:
    out = Path(out)
    if out.exists() and out.is_dir():
        raise LowbitError(f"output file {out}: is a folder; fix: pass a file name ending in .gguf")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"output file {out}: folder {parent} is not writable; fix: choose another --out")
    return parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def write_gguf(model: nn.Module, out: str | Path, gguf_type: str = "auto", source: dict | None = None,
               folder: Path | None = None, imatrix: dict[str, torch.Tensor] | None = None,
               name: str | None = None, progress=None) -> GGUFExport:
    """Write model as a GGUF file (see the module docstring for the type rules)."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_ARCH, get_tensor_name_map

    from lowbit.model.qlinear import QLinear

    gguf_type = normalize_type(gguf_type)
    out = Path(out)
    _arch_check(model)
    if gguf_type in LLAMA_CPP_TYPES:
        return _via_llama_cpp(model, out, gguf_type, source, folder, imatrix, name, progress)
    config = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    notes: list[str] = []
    # plan every tensor first: a scheme GGUF cannot hold fails before anything is written
    plan = []
    float_model = not any(isinstance(m, QLinear) for m in model.modules())
    linear_weights = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for hf_name, t in _weights(model):
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
    tmp = _atomic_target(out)
    file_type = {"auto": LlamaFileType.GUESSED, "F32": LlamaFileType.ALL_F32}.get(
        gguf_type, LlamaFileType[f"MOSTLY_{gguf_type}"] if f"MOSTLY_{gguf_type}" in LlamaFileType.__members__
        else LlamaFileType.GUESSED)
    result = GGUFExport(out, gguf_type, {}, notes)
    writer = GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name or (source or {}).get("name", "lowbit export"))
        _hparams(writer, config, int(file_type))
        _tokenizer_kvs(writer, source_gguf(source), folder, config.vocab_size, notes)
        requant_from: dict[str, list[str]] = {}
        for i, (hf_name, g_name, t, (how, what)) in enumerate(plan):
            if progress:
                progress(g_name, i, len(plan))
            if how == "exact":
                type_name, blocks = what
                arr = _maybe_permute(blocks, hf_name, config).numpy()
                raw = GGMLQuantizationType[type_name]
                result.exact += 1
            else:
                w = t.dequantized_weight(torch.float32) if isinstance(t, QLinear) else t.detach().float()
                if how == "requant":
                    requant_from.setdefault(f"{t.spec.label} -> {what}", []).append(hf_name)
                    result.requantized += 1
                type_name = what
                arr, raw = quantize_as(_maybe_permute(w, hf_name, config), type_name)
            writer.add_tensor(g_name, np.ascontiguousarray(arr), raw_dtype=raw)
            result.tensor_types[g_name] = type_name
        for what, mods in requant_from.items():
            notes.append(f"requantized (no exact GGUF equivalent) {what}: {len(mods)} module(s), e.g. {mods[0]}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return result


def _maybe_permute(x: torch.Tensor, hf_name: str, config) -> torch.Tensor:
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        return _permute_rows(x, config.num_attention_heads)
    if hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        return _permute_rows(x, config.num_key_value_heads)
    return x


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


def _via_llama_cpp(model, out, gguf_type, source, folder, imatrix, name, progress) -> GGUFExport:
    from lowbit.export import llamacpp

    f32 = out.resolve().parent / f".{out.name}.f32-{uuid.uuid4().hex[:8]}.gguf"
    try:
        base = write_gguf(model, f32, "F32", source, folder, None, name, progress)
        imx = {k: v for k, v in imatrix_by_gguf_name(imatrix, model.config.num_hidden_layers).items()
               if k in base.tensor_types}  # e.g. no output.weight when the head is tied
        types = llamacpp.quantize(f32, out, gguf_type, imatrix=imx or None)
    finally:
        if f32.exists():
            f32.unlink()
    notes = [n for n in base.notes if not n.startswith("requantized")]
    notes.append(f"quantized by llama.cpp ({gguf_type}) from the F32 dequantization of the model"
                 + (f", with lowbit's importance matrix for {len(imx)} tensors" if imx else ", without an importance matrix"))
    counts = Counter(types.values())
    notes.append("llama.cpp chose: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
    res = GGUFExport(out, gguf_type, types, notes)
    res.requantized = base.requantized
    return res
