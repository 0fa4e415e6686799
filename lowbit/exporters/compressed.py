"""compressed-tensors export: a lowbit model to the checkpoint folder format transformers loads and
vLLM reads (`quantization_config.quant_method: compressed-tensors`; loading in vLLM is untested here),
written by the compressed-tensors library.

Each QLinear becomes an nn.Linear carrying a compressed-tensors QuantizationScheme whose qparams
(weight_scale, weight_zero_point, input_scale) are lowbit's own; the library's ModelCompressor then
packs the weights and writes the config, exactly as llm-compressor does when it saves. Mapping:

    lowbit scheme                                 compressed-tensors                       format
    int 2-8 bit weight-only, sym or int-zero asym  W{b}A16 int, group/channel/tensor        pack-quantized
    int8 sym + int8_dynamic activations            W8A8 int8, per-token dynamic input       int-quantized
    int8 sym + int8_static activations             W8A8 int8, static per-tensor input_scale int-quantized
    fp8_e4m3 (channel/tensor/group)                FP8 weights                              float-quantized

Exact: the packed codes, scales and zero points are lowbit's (compressed-tensors' zero points are
signed, z_ct = z - 2**(b-1), the same integer grid). Not exact, requantized round-to-nearest from
lowbit's dequantized weight with the same bits/group and an integer zero point, with a note:
the float zero domain (asym-f, GGUF Q4_1 style; compressed-tensors' int formats store integer zero
points) and act-order column permutations (perm). Refused with the nearest choices: NF4 and FP8 E5M2.
Static INT8 activations clamp to [-128, 127] in compressed-tensors and [-127, 127] in lowbit.

Kept tensors (embeddings, norms, an ignored lm_head) are stored in the recipe's keep_dtype, and
config.json's dtype says so; scales keep lowbit's storage dtype. The folder is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import affine
from lowbit.formats.affine import torch_dtype
from lowbit.formats.qtensor import zero_of
from lowbit.model.artifact import move_into_place, output_lock, prepare_out_dir, temp_beside
from lowbit.model.handle import Model
from lowbit.model.qlinear import QEmbedding, QLinear
from lowbit.model.quantize import set_submodule


@dataclass
class CTExport:
    path: Path
    formats: dict[str, str]  # module -> compressed-tensors format
    notes: list[str] = field(default_factory=list)
    exact: int = 0
    requantized: int = 0

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def _ct():
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise LowbitError("compressed-tensors export: the compressed-tensors package is not installed; "
                          "fix: pip install compressed-tensors==0.20.0")


def _strategy(spec) -> dict:
    if spec.granularity == "group":
        return {"strategy": "group", "group_size": spec.group_size}
    return {"strategy": spec.granularity}


FORMATS = {"pack": "pack-quantized", "int": "int-quantized", "float": "float-quantized"}


def scheme_for(spec, modules: list[str]):
    """The compressed-tensors QuantizationScheme (with its format) of a lowbit spec, targeting `modules`."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    where = f"module {modules[0]}" + (f" (and {len(modules) - 1} more)" if len(modules) > 1 else "")
    if spec.kind == "nf4":
        raise LowbitError(
            f"{where}: scheme '{spec.label}' (NF4) has no compressed-tensors equivalent; fix: re-quantize with the "
            f"nearest supported scheme, int4 group (W4A16: kind int, bits 4, granularity group, group_size 64 or 128), "
            f"or export NF4 to lowbit's native format")
    if spec.kind == "fp8_e5m2":
        raise LowbitError(
            f"{where}: scheme '{spec.label}' (FP8 E5M2) has no compressed-tensors equivalent (it holds E4M3); "
            f"fix: re-quantize with kind fp8_e4m3 (nearest) or int8")
    if spec.kind == "fp8_e4m3":
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, **_strategy(spec))
        return QuantizationScheme(targets=list(modules), weights=weights, format=FORMATS["float"])
    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, **_strategy(spec))
    acts = None
    if spec.activation == "int8_dynamic":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    elif spec.activation == "int8_static":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    fmt = FORMATS["int"] if acts is not None else FORMATS["pack"]
    return QuantizationScheme(targets=list(modules), weights=weights, input_activations=acts, format=fmt)


def _qparams(qlin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
    """(float weight, scale, compressed-tensors zero point or None, note) on lowbit's grid."""
    from dataclasses import replace

    spec, qt = qlin.spec, qlin.qtensor()
    t = qt.tensors
    w = qlin.dequantized_weight(torch.float32)
    if spec.kind != "int":
        return w, t["scale"], None, ""
    exact = "perm" not in t and not (not spec.symmetric and spec.zero_domain == "float")
    if not exact:
        why = "act-order permutation" if "perm" in t else "float zero point (asym-f)"
        int_spec = replace(spec, zero_domain="int")
        scale, zero = affine.choose_qparams(w, int_spec)
        w = affine.dequantize(affine.quantize(w, scale, zero, int_spec), scale, zero, int_spec)
        zp = None if zero is None else zero.to(torch.int16) - 2 ** (spec.bits - 1)
        return w, scale, (None if zp is None else zp.to(torch.int8)), why
    zero = zero_of(t)
    zp = None if zero is None else (zero.to(torch.int16) - 2 ** (spec.bits - 1)).to(torch.int8)
    return w, t["scale"], zp, ""


def write_compressed(handle: Model, out: str | Path, force: bool = False, progress=None) -> CTExport:
    """Write a lowbit-quantized model as a compressed-tensors checkpoint folder (under a temporary name
    beside out, holding the writer's lock on out, renamed into place; see lowbit.model.artifact)."""
    with output_lock(out, force):  # released (and its lock file removed) however the export ends
        return _write_compressed(handle, out, force, progress)


def _write_compressed(handle: Model, out: str | Path, force: bool = False, progress=None) -> CTExport:
    _ct()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle import initialize_module_for_quantization

    out = Path(out)
    model, tokenizer, recipe = handle.module, handle.tokenizer, handle.recipe
    qmods = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if not qmods:
        raise LowbitError("compressed-tensors export: the model has no lowbit-quantized linear module; "
                          "fix: pass a lowbit artifact (lowbit quantize ... --out DIR)")
    by_spec: dict = {}
    for n, m in qmods:
        by_spec.setdefault(m.spec, []).append(n)
    schemes = {}
    for spec, names in by_spec.items():  # refusals before anything is built
        sch = scheme_for(spec, names)
        schemes.update({n: sch for n in names})
    prepare_out_dir(out, force)
    model = copy.deepcopy(model)  # modules are swapped and compressed in place; the caller's model stays as it is
    keep = torch_dtype(recipe.keep_dtype if recipe else "float16")

    emb = model.get_input_embeddings()
    if isinstance(emb, QEmbedding):
        # compressed-tensors has no quantized embedding: write the table as the head's rows, dequantized
        # (exact values, in keep_dtype), beside the quantized head
        if emb.embed_scale is not None:  # Gemma-style scaled embedding: a plain table would lose the scale
            raise LowbitError("compressed-tensors export: this model's scaled embedding reads a quantized head; "
                              "fix: quantize with the head kept (recipe ignore: [lm_head]) for this export")
        table = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        table.weight = nn.Parameter(emb.head.dequantized_weight(keep), requires_grad=False)
        model.set_input_embeddings(table)
    res = CTExport(out, {})
    requant: dict[str, list[str]] = {}
    for i, (name, q) in enumerate(qmods):
        if progress:
            progress(name, i, len(qmods))
        w, scale, zp, why = _qparams(q)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if q.bias is not None:
                lin.bias.copy_(q.bias.float())
        initialize_module_for_quantization(lin, schemes[name], force_zero_point=False)
        with torch.no_grad():
            lin.weight_scale.data = scale.reshape(lin.weight_scale.shape).clone()
            if zp is not None:
                lin.weight_zero_point.data = zp.reshape(lin.weight_zero_point.shape).to(lin.weight_zero_point.dtype)
            if q.spec.activation == "int8_static":
                lin.input_scale.data = q.input_scale.float().reshape(lin.input_scale.shape)
        lin.quantization_status = QuantizationStatus.FROZEN
        set_submodule(model, name, lin)
        if why:
            requant.setdefault(f"{q.spec.label} ({why})", []).append(name)
            res.requantized += 1
        else:
            res.exact += 1
    for what, mods in requant.items():
        res.notes.append(f"requantized to an integer zero point, same bits and groups: {what}, {len(mods)} module(s), "
                         f"e.g. {mods[0]}")
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with torch.no_grad():  # kept tensors in keep_dtype (as the artifact stores them); packed ints untouched
        for mod_name, mod in model.named_modules():
            if hasattr(mod, "quantization_scheme"):
                continue  # packed/int8/fp8 weights and scales stay as the compressor wrote them
            for pname, p in list(mod.named_parameters(recurse=False)):
                if p.is_floating_point() and p.dtype != keep:
                    p.data = p.data.to(keep)
    for n, _ in qmods:
        res.formats[n] = str(getattr(model.get_submodule(n).quantization_scheme, "format", "") or "")
    tmp = temp_beside(out)
    try:
        config = model.config
        config.dtype = keep
        model.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(keep).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        move_into_place(tmp, out, force)  # refuses an out that appeared meanwhile, unless force
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return res
