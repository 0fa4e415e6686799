"""lowbit: quantize an LLM and prove, with numbers, that it is still good enough to ship."""

__version__ = "0.1.0"

from lowbit.errors import LowbitError
from lowbit.formats import QTensor, QuantSpec, dequantize_tensor, quantize_tensor


def __getattr__(name: str):
    # The model layer pulls in transformers; import it only when asked for.
    if name in ("quantize", "load", "save", "Recipe", "preset", "PRESETS"):
        from lowbit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["LowbitError", "QTensor", "QuantSpec", "dequantize_tensor", "quantize_tensor",
           "quantize", "load", "save", "Recipe", "preset", "PRESETS", "__version__"]
