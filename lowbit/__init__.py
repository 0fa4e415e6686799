"""lowbit: quantize an LLM and prove, with numbers, that it is still good enough to ship.

The verbs (load, quantize, save, evaluate, gate, bench, export, generate) and the handle they pass
around (lowbit.Model) are in lowbit.api, and lowbit.tune (the search over mixed formats) in lowbit.tuner; they are imported on first use, since they pull in
transformers, while the tensor formats below import only torch.
"""

from lowbit.errors import LowbitError
from lowbit.formats import QTensor, QuantSpec, dequantize_tensor, quantize_tensor
from lowbit.version import __version__

_API = ("Model", "load", "quantize", "save", "evaluate", "gate", "bench", "export", "generate", "Generated",
        "CalibConfig", "EvalConfig", "BenchConfig", "Recipe", "preset", "PRESETS")
_TUNER = ("tune", "TuneConfig", "TuneResult")


def __getattr__(name: str):
    if name in _API:
        from lowbit import api

        return getattr(api, name)
    if name in _TUNER:
        from lowbit import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["LowbitError", "QTensor", "QuantSpec", "dequantize_tensor", "quantize_tensor", "__version__", *_API, *_TUNER]
