"""QLinear: an nn.Linear replacement that holds a QTensor's stored tensors as buffers.

The forward pass here is the reference path: dequantize to the activation dtype, then F.linear.
Dynamic INT8 (`activation: int8_dynamic`) quantizes each token's activations to int8 at run time and
multiplies int8 x int8 -> int32 with torch._int_mm, then rescales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QTensor, QuantSpec, dequantize_tensor, quantize_tensor


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self._names = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None) -> "QLinear":
        qt = quantize_tensor(weight, spec)
        return cls(weight.shape[1], weight.shape[0], spec, qt.tensors, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QLinear":
        return cls.from_weight(linear.weight.detach(), spec, linear.bias)

    def qtensor(self) -> QTensor:
        return QTensor(self.spec, (self.out_features, self.in_features), {n: getattr(self, n) for n in self._names})

    @property
    def nbytes(self) -> int:
        return self.qtensor().nbytes

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_tensor(self.qtensor(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activation != "none":
            return self._forward_int8_act(x)
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _forward_int8_act(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (tokens, in)
        if self.spec.activation == "int8_static":
            sx = self.input_scale.float().reshape(1, 1)  # calibrated, one per module
        else:
            amax = x2.abs().amax(dim=-1, keepdim=True)  # (tokens, 1)
            sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        xq = torch.clamp(torch.round(x2 / sx), -127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qdata.t())  # (tokens, out) int32
        # scale is (out, 1) per channel or (1, 1) per tensor: broadcast it along the output dim.
        y = acc.float() * sx * self.scale.float().reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.label}, bias={self.bias is not None}"
