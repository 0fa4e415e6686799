"""Calibration-based quantization: GPTQ, AWQ, SmoothQuant W8A8 and MSE clipping, run block by block.

The public entry is lowbit.quantize(model, recipe, calib=CalibConfig(...)); this package holds the
loop (sequential.py), the algorithms and the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from lowbit.calib.data import BUILTIN, CalibData, load_calibration
from lowbit.calib.sequential import METHODS, CalibOptions, Calibrated, TensorSource, check_method, quantize_sequential
from lowbit.errors import LowbitError
from lowbit.model import sources
from lowbit.model.artifact import prepare_out_dir, save_artifact
from lowbit.model.handle import Model
from lowbit.model.load import float_folder
from lowbit.model.qlinear import prepare_model
from lowbit.model.skeleton import empty_model, finish_model, load_tokenizer
from lowbit.recipe import Recipe

DEFAULT_CALIB = "mix"


@dataclass(frozen=True)
class CalibConfig(CalibOptions):
    """How to calibrate: the method, the prompts and the algorithms' settings (CalibOptions' fields)."""

    method: str | None = None  # rtn, rtn-mse, gptq, awq, awq-gptq, smoothquant, learned; None: see method_for
    data: str | Path | tuple | list | CalibData = DEFAULT_CALIB  # a .txt/.jsonl file, a built-in set, or texts
    samples: int = 128  # calibration windows
    seq_len: int = 512  # tokens per window

    def options(self) -> CalibOptions:
        return CalibOptions(**{f.name: getattr(self, f.name) for f in fields(CalibOptions)})


def method_for(recipe: Recipe, calib: CalibConfig | None) -> str:
    """The one defaulting rule: an explicit method wins; calibration data with an RTN recipe means
    GPTQ; otherwise the recipe's own algorithm."""
    if calib is None:
        return recipe.algorithm
    if calib.method:
        return calib.method
    return "gptq" if recipe.algorithm == "rtn" else recipe.algorithm


def calibrate(model: Model, recipe: Recipe, calib: CalibConfig, progress=None) -> Model:
    """Quantize a model already in memory, block by block (in place; returns the handle)."""
    method = method_for(recipe, calib)
    check_method(method, recipe, calib.options())
    tok = model.need_tokenizer("quantize with calibration")
    data = calib.data if isinstance(calib.data, CalibData) else load_calibration(calib.data, tok, calib.samples, calib.seq_len)
    done = quantize_sequential(model.module, recipe, method, data, None, calib.options(), progress)
    return _record(model, done)


def calibrate_checkpoint(name_or_path: str | Path, recipe: Recipe, calib: CalibConfig, out: str | Path | None = None,
                         progress=None, force: bool = False, say=lambda msg: None, kernels: bool = True) -> Model:
    """Quantize a float checkpoint with calibration, streaming it block by block from disk.

    With `out`, the artifact is written there (atomically) from the stored form, before the kernels
    repack the weights. kernels=False skips picking the CPU kernels after saving (each module then picks
    its own on first use), for callers that only want the artifact: packing every weight into the
    kernels' layout is the highest point of memory otherwise.
    """
    method = method_for(recipe, calib)
    check_method(method, recipe, calib.options())
    if out is not None:
        prepare_out_dir(Path(out), force)
    src = sources.resolve(name_or_path)
    folder, digest = float_folder(src, say)
    tokenizer = load_tokenizer(folder)
    data = calib.data if isinstance(calib.data, CalibData) else load_calibration(calib.data, tokenizer, calib.samples,
                                                                                 calib.seq_len)
    say(f"calibration: {data.describe()}")
    module = empty_model(folder, torch.float32)
    done = quantize_sequential(module, recipe, method, data, TensorSource(folder), calib.options(), progress, kernels=False)
    model = _record(Model(finish_model(module, folder), tokenizer, {**src.describe(), "sha256": digest}, folder), done)
    if out is not None:
        if progress:
            progress("saving", 1, 1)
        save_artifact(model, out, force)
    if kernels:
        if progress:
            progress("kernels", 1, 1)
        prepare_model(model.module)
    return model


def _record(model: Model, done: Calibrated) -> Model:
    model.plan, model.recipe, model.imatrix, model.calibration = done.plan, done.recipe, done.imatrix, done.record
    return model


__all__ = ["CalibConfig", "calibrate", "calibrate_checkpoint", "method_for", "load_calibration", "CalibOptions",
           "CalibData", "METHODS", "BUILTIN", "DEFAULT_CALIB", "LowbitError"]
