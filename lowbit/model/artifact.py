"""lowbit's artifact format, in one place: constants, reader, writer and the atomic folder helpers.

An artifact is a folder a new process loads back to identical logits:

    model.safetensors   QLinear buffers (qdata, scale, ...) and every kept tensor in keep_dtype
    config.json         the transformers config (tie_word_embeddings off when the head is quantized;
                        lowbit.json's "embedding": "lm_head" then says the embedding reads the head's rows)
    tokenizer files     copied through the tokenizer's own save_pretrained
    lowbit.json         format + version, lowbit version, recipe, per-module plan, source identity,
                        and the calibration record (method, data statistics) when one was used
    imatrix.safetensors optional: per-input-channel mean squared activation of each quantized
                        module (an importance matrix), from calibration; the GGUF export uses it

The folder is written under a temporary name beside the target and renamed into place, so an
interrupted run leaves no half-written artifact; every exporter uses the same helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.formats.affine import torch_dtype
from lowbit.model import sources
from lowbit.model.handle import Model
from lowbit.model.qlinear import QEmbedding, QLinear, prepare_model, share_embedding
from lowbit.model.quantize import fits_dtype, plans_from_json, plans_to_json, set_submodule
from lowbit.model.skeleton import empty_model, finish_model, load_tokenizer, set_tensor
from lowbit.model.st_writer import Entry, entry_of, write_tensors
from lowbit.recipe import Recipe
from lowbit.version import __version__

ARTIFACT_FILE = sources.ARTIFACT_FILE  # lowbit.json: what makes a folder an artifact
ARTIFACT_FORMAT = "lowbit"
ARTIFACT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
IMATRIX_FILE = "imatrix.safetensors"


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse to clobber an existing folder unless forced; fail early on an unwritable parent."""
    if out.exists() and not force:
        raise LowbitError(f"output folder {out}: already exists; fix: choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output folder {out}: is a file; fix: choose another --out")
    existing = out.resolve().parent
    while not existing.exists():  # created only when the artifact is written
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise LowbitError(f"output folder {out}: {existing} is not a writable folder; fix: choose another --out")


def temp_beside(out: Path, suffix: str = "") -> Path:
    """A fresh hidden path in out's folder (same filesystem, so renaming it into place is atomic)."""
    return out.resolve().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder to out; an existing out (--force) is swapped out only now."""
    if out.exists():
        old = out.resolve().parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def artifact_entries(model: torch.nn.Module, keep_dtype: str) -> list[Entry]:
    """Tensors to store, as the state dict names them: QLinear buffers as they are (codes a kernel
    holds in its own layout are rebuilt one module at a time, when written), other floats in
    keep_dtype (a tensor that would overflow it stays as it is), tied copies once."""
    dt = torch_dtype(keep_dtype)
    entries, seen = [], set()

    def add(name: str, t: torch.Tensor, in_qlinear: bool) -> None:
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            return
        seen.add(key)
        if in_qlinear or not t.is_floating_point() or t.dtype == dt:
            entries.append(entry_of(name, t))
            return
        entries.append(Entry(name, dt, tuple(t.shape), lambda: t) if fits_dtype(t, dt) else entry_of(name, t))

    for mname, mod in model.named_modules():
        prefix = mname + "." if mname else ""
        for n, p in mod.named_parameters(recurse=False):
            add(prefix + n, p.detach(), isinstance(mod, QLinear) and n != "bias")
        for n, b in mod.named_buffers(recurse=False):
            if b is not None and n not in mod._non_persistent_buffers_set:
                add(prefix + n, b, isinstance(mod, QLinear))
        if isinstance(mod, QLinear) and "qdata" in mod._names and "qdata" not in mod._buffers:
            shape, dtype = mod.stored_meta("qdata")
            entries.append(Entry(prefix + "qdata", dtype, shape, lambda m=mod: m._stored("qdata")))
    return entries


def save_artifact(model: Model, out: str | Path, force: bool = False) -> Path:
    """Write a quantized model as an artifact folder (atomically); refuses a model without a
    quantization plan or a tokenizer, since the folder could not be loaded back."""
    out = Path(out)
    if model.recipe is None or model.plan is None:
        raise LowbitError("save: the model has not been quantized by lowbit (no recipe); call lowbit.quantize first")
    tokenizer = model.need_tokenizer("save")
    module = model.module
    prepare_out_dir(out, force)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out)
    tmp.mkdir()
    try:
        write_tensors(tmp / WEIGHTS_FILE, artifact_entries(module, model.recipe.keep_dtype), metadata={"format": "pt"})
        if model.imatrix:
            save_file({k: v.float().contiguous() for k, v in model.imatrix.items()}, str(tmp / IMATRIX_FILE),
                      metadata={"what": "mean of x**2 per input channel, keyed by module name"})
        module.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "lowbit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": model.source,
            "recipe": model.recipe.to_dict(),
            "modules": plans_to_json(model.plan),
        }
        if isinstance(module.get_input_embeddings(), QEmbedding):
            meta["embedding"] = "lm_head"  # embeddings read from the quantized head's rows
        if model.calibration:
            meta["calibration"] = model.calibration
        (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1))
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- reading ---------------------------------------------------------------------------------------
def read_meta(folder: Path) -> dict:
    """lowbit.json, checked: the format, a version this lowbit reads, and a modules table."""
    meta_path = folder / ARTIFACT_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"artifact file {meta_path}: cannot be read as JSON ({e}); the artifact is damaged; quantize again") from None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT or not isinstance(meta.get("modules"), dict):
        raise LowbitError(f"artifact file {meta_path}: field 'format' must be '{ARTIFACT_FORMAT}' with a 'modules' table; "
                          f"this is not a lowbit artifact")
    if meta.get("format_version", 0) > ARTIFACT_FORMAT_VERSION:
        raise LowbitError(f"artifact file {meta_path}: field 'format_version' is {meta['format_version']}, newer than this "
                          f"lowbit reads ({ARTIFACT_FORMAT_VERSION}); fix: upgrade lowbit")
    return meta


def load_artifact(folder: Path, dtype: torch.dtype = torch.float32) -> Model:
    """An artifact folder as a quantized model on its CPU kernels (with the KV-cache format its recipe chose)."""
    from safetensors import safe_open

    folder = Path(folder)
    meta = read_meta(folder)
    meta_path = folder / ARTIFACT_FILE
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LowbitError(f"artifact {folder}: {WEIGHTS_FILE} is missing; the artifact is incomplete; quantize again")
    sources.check_safetensors(weights)
    plans = plans_from_json(meta["modules"])
    model = empty_model(folder, dtype)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for p in plans:
            if p.spec is None:
                continue
            prefix = p.name + "."
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix) and k != prefix + "bias"}
            bias = f.get_tensor(prefix + "bias").to(dtype) if prefix + "bias" in keys else None
            if "qdata" not in tensors:
                raise LowbitError(f"artifact {weights}: tensors of module {p.name} are missing; the artifact is damaged; quantize again")
            set_submodule(model, p.name, QLinear(p.in_features, p.out_features, p.spec, tensors, bias))
            keys -= {prefix + n for n in tensors} | {prefix + "bias"}
        if meta.get("embedding") == "lm_head" and not share_embedding(model):
            raise LowbitError(f"artifact file {meta_path}: field 'embedding' says the embeddings are the head's rows, "
                              f"but the head is not a per-row INT8/FP8 module; the artifact is damaged; quantize again")
        for k in keys:
            t = f.get_tensor(k)
            set_tensor(model, k, t.to(dtype) if t.is_floating_point() else t)
    recipe = Recipe.from_dict(meta["recipe"], f"artifact file {meta_path}: field 'recipe'")
    prepare_model(model)
    imatrix = None
    if (folder / IMATRIX_FILE).is_file():
        from safetensors.torch import load_file

        sources.check_safetensors(folder / IMATRIX_FILE)
        imatrix = load_file(str(folder / IMATRIX_FILE))
    loaded = Model(finish_model(model, weights), load_tokenizer(folder), meta.get("source", {}), folder, meta,
                   plan=plans, recipe=recipe, imatrix=imatrix, calibration=meta.get("calibration") or None)
    if recipe.kv_cache != "none":  # the recipe chose the KV-cache format this artifact runs with
        loaded.kv_cache = recipe.kv_cache
    return loaded
