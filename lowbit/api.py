"""The public Python API: quantize, load, save."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec
from lowbit.model.load import load_artifact, load_model, load_streaming, load_tokenizer
from lowbit.model.quantize import quantize_model
from lowbit.recipe import PRESETS, Recipe, preset, resolve_recipe


def quantize(model: nn.Module, recipe: Recipe | str | Path = "int8", progress=None, method: str | None = None,
             calib=None, samples: int = 128, seq_len: int = 512, tokenizer=None) -> nn.Module:
    """Quantize `model` in place with a Recipe, a preset name or a recipe file; returns the model.

    With a method other than "rtn" (gptq, awq, awq-gptq, smoothquant, rtn-mse) or calibration data (a .txt/.jsonl
    path, a built-in set name, or a list of texts), the model is calibrated block by block.
    To quantize a checkpoint too large for memory, use lowbit.calib.quantize_calibrated, which streams it.

    >>> lowbit.quantize(model, "w4-g128")
    >>> lowbit.quantize(model, "w4-g128", method="gptq", calib="mix", samples=128, seq_len=512)
    """
    rec = resolve_recipe(recipe)
    method = method or ("gptq" if calib is not None and rec.algorithm == "rtn" else rec.algorithm)
    if method == "rtn" and calib is None:
        quantize_model(model, rec, progress)
        return model
    from lowbit.calib import DEFAULT_CALIB, quantize_model_calibrated

    tok = tokenizer if tokenizer is not None else getattr(model, "lowbit_tokenizer", None)
    if tok is None:
        raise LowbitError("quantize: calibration needs the model's tokenizer; pass tokenizer=..., or load the model "
                          "with lowbit.load (which keeps it on the model)")
    quantize_model_calibrated(model, tok, rec, method, DEFAULT_CALIB if calib is None else calib, samples, seq_len,
                              progress=progress)
    return model


def load(path: str | Path, load_in_4bit: bool = False, load_in_8bit: bool = False, quant_type: str = "nf4",
         double_quant: bool = True, group_size: int = 64, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model: a lowbit artifact, or a float model (HF folder, GGUF, bundled name).

    With load_in_4bit (quant_type "nf4" or "int4") or load_in_8bit, the float weights are quantized
    while they stream in, one tensor at a time; compute_dtype (default bfloat16) is what the
    dequantized weights and the rest of the model compute in. The tokenizer is on `model.lowbit_tokenizer`.
    """
    if load_in_4bit and load_in_8bit:
        raise LowbitError("load: choose one of load_in_4bit and load_in_8bit")
    if load_in_4bit or load_in_8bit:
        if load_in_8bit:
            spec = QuantSpec(kind="int", bits=8, granularity="channel")
        elif quant_type == "nf4":
            spec = QuantSpec(kind="nf4", bits=4, granularity="group", group_size=group_size, double_quant=double_quant)
        elif quant_type == "int4":
            spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=group_size, symmetric=False,
                             scale_dtype="float16")
        else:
            raise LowbitError(f"load: quant_type '{quant_type}' is unknown; use 'nf4' or 'int4'")
        recipe = Recipe(scheme=spec, name=f"load-{'8bit' if load_in_8bit else quant_type}", group_fallback="shrink")
        loaded = load_streaming(path, recipe, compute_dtype or torch.bfloat16)
    else:
        loaded = load_model(path, compute_dtype or torch.float32)
    return loaded.model


def save(model: nn.Module, out: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Write a quantized model as a lowbit artifact folder (atomically)."""
    from lowbit.export.native import save_artifact

    tok = tokenizer if tokenizer is not None else getattr(model, "lowbit_tokenizer", None)
    return save_artifact(model, tok, out, getattr(model, "lowbit_source", {}), force)


__all__ = ["quantize", "load", "save", "load_artifact", "load_tokenizer", "Recipe", "preset", "PRESETS"]
