"""L0: pure tensor math for quantized formats. No nn.Module, no I/O, no globals."""

from lowbit.formats.qtensor import QTensor, dequantize_tensor, qdq, quantize_tensor
from lowbit.formats.spec import QuantSpec

__all__ = ["QTensor", "QuantSpec", "dequantize_tensor", "qdq", "quantize_tensor"]
