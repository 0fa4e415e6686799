"""The native lowbit artifact: a folder a new process can load back to identical logits.

    model.safetensors   QLinear buffers (qdata, scale, ...) and every kept tensor in keep_dtype
    config.json         the transformers config (tie_word_embeddings off when the head is quantized;
                        lowbit.json's "embedding": "lm_head" then says the embedding reads the head's rows)
    tokenizer files     copied through the tokenizer's own save_pretrained
    lowbit.json         format + version, lowbit version, recipe, per-module plan, source identity,
                        and the calibration record (method, data statistics) when one was used
    imatrix.safetensors optional: per-input-channel mean squared activation of each quantized
                        module (an importance matrix), from calibration; the GGUF export uses it

The folder is written under a temporary name beside the target and renamed into place, so an
interrupted run leaves no half-written artifact.
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

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.formats.affine import torch_dtype
from lowbit.model.load import ARTIFACT_FORMAT, ARTIFACT_FORMAT_VERSION, IMATRIX_FILE
from lowbit.model.qlinear import QLinear
from lowbit.model.quantize import fits_dtype, plans_to_json
from lowbit.model.sources import ARTIFACT_FILE
from lowbit.model.st_writer import Entry, entry_of, write_tensors


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


def save_artifact(model: torch.nn.Module, tokenizer, out: str | Path, source: dict, force: bool = False) -> Path:
    out = Path(out)
    recipe = getattr(model, "lowbit_recipe", None)
    plans = getattr(model, "lowbit_plan", None)
    if recipe is None or plans is None:
        raise LowbitError("save: the model has not been quantized by lowbit (no recipe attached); call lowbit.quantize first")
    prepare_out_dir(out, force)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = out.resolve().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_tensors(tmp / "model.safetensors", artifact_entries(model, recipe.keep_dtype), metadata={"format": "pt"})
        imatrix = getattr(model, "lowbit_imatrix", None)
        if imatrix:
            save_file({k: v.float().contiguous() for k, v in imatrix.items()}, str(tmp / IMATRIX_FILE),
                      metadata={"what": "mean of x**2 per input channel, keyed by module name"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "lowbit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source,
            "recipe": recipe.to_dict(),
            "modules": plans_to_json(plans),
        }
        if getattr(model, "lowbit_embedding", None):
            meta["embedding"] = model.lowbit_embedding  # embeddings read from the quantized head's rows
        calibration = getattr(model, "lowbit_calibration", None)
        if calibration:
            meta["calibration"] = calibration
        (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1))
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
