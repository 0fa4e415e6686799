"""Calibration-based quantization: GPTQ, AWQ, SmoothQuant W8A8 and MSE clipping, run block by block.

    lowbit.calib.quantize_calibrated("smollm2-135m", "w4-g128", "gptq", calib="mix", samples=128,
                                     seq_len=512, out="out/smollm2-w4-gptq")
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.calib.data import BUILTIN, CalibData, load_calibration
from lowbit.calib.sequential import METHODS, CalibOptions, TensorSource, quantize_sequential
from lowbit.errors import LowbitError
from lowbit.recipe import Recipe, resolve_recipe

DEFAULT_CALIB = "mix"


def quantize_calibrated(name_or_path: str | Path, recipe: Recipe | str | Path, method: str | None = None,
                        calib: str | Path | list[str] = DEFAULT_CALIB, samples: int = 128, seq_len: int = 512,
                        out: str | Path | None = None, options: CalibOptions | None = None, progress=None,
                        force: bool = False, say=lambda msg: None, kernels: bool = True):
    """Quantize a float checkpoint with calibration, streaming it block by block from disk.

    method: "gptq", "awq", "awq-gptq" (AWQ scales folded in, then GPTQ rounding), "smoothquant", "rtn-mse" or "rtn" (default: the recipe's algorithm).
    calib: a .txt or .jsonl file, a built-in set (see lowbit.calib.data.BUILTIN) or a list of texts.
    Returns the Loaded quantized model; with `out`, also writes the artifact there (atomically).
    kernels=False skips picking the CPU kernels after saving (each module then picks its own on first
    use): for callers that only want the artifact, as the CLI does. Packing every weight into the
    kernels' layout was the highest point of memory in the capped benchmark.
    """
    from lowbit.model import sources
    from lowbit.model.load import Loaded, empty_model, float_folder, load_tokenizer

    rec = resolve_recipe(recipe)
    method = method or rec.algorithm
    from lowbit.calib.sequential import check_method

    check_method(method, rec)
    if out is not None:
        from lowbit.export.native import prepare_out_dir

        prepare_out_dir(Path(out), force)
    src = sources.resolve(name_or_path)
    folder, digest = float_folder(src, say)
    tokenizer = load_tokenizer(folder)
    data = load_calibration(calib, tokenizer, samples, seq_len)
    say(f"calibration: {data.describe()}")
    model = empty_model(folder, torch.float32)
    quantize_sequential(model, rec, method, data, TensorSource(folder), options or CalibOptions(), progress,
                        kernels=False)
    from lowbit.model.load import _finish
    from lowbit.model.qlinear import prepare_model

    loaded = Loaded(_finish(model, folder), tokenizer, {**src.describe(), "sha256": digest}, folder)
    if out is not None:  # saved from the stored form, before the kernels repack the weights
        from lowbit.export.native import save_artifact

        if progress:
            progress("saving", 1, 1)
        save_artifact(loaded.model, tokenizer, out, loaded.source, force)
    if kernels:
        if progress:
            progress("kernels", 1, 1)
        prepare_model(loaded.model)
    return loaded


def quantize_model_calibrated(model, tokenizer, recipe: Recipe | str | Path, method: str | None = None,
                              calib: str | Path | list[str] | CalibData = DEFAULT_CALIB, samples: int = 128,
                              seq_len: int = 512, options: CalibOptions | None = None, progress=None):
    """The same loop on a model already in memory (quantized in place; returns it)."""
    rec = resolve_recipe(recipe)
    data = calib if isinstance(calib, CalibData) else load_calibration(calib, tokenizer, samples, seq_len)
    quantize_sequential(model, rec, method or rec.algorithm, data, None, options or CalibOptions(), progress)
    return model


__all__ = ["quantize_calibrated", "quantize_model_calibrated", "load_calibration", "CalibOptions", "CalibData",
           "METHODS", "BUILTIN", "LowbitError"]
