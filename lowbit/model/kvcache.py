"""KV-cache quantization: INT8 or FP8 keys and values with one scale per token and head.

A scale per (token, head) means each new token is quantized on its own when it arrives: nothing
already cached is ever re-quantized, and an outlier token cannot blur the rest of the cache.

    int8:  s = amax(|x| over head_dim) / 127,  q = round(x / s)  (int8)
    fp8:   s = amax / 448,                     q = (x / s) as float8_e4m3fn

Cost: head_dim bytes + one fp32 scale per token-head instead of 4 * head_dim bytes (fp32) — for
head_dim 64, 68 against 256 bytes (0.27x) — plus one dequantization of the cache per step.

`QuantizedKVCache` plugs this into transformers' cache interface (a Cache of quantized layers), so
any model's own forward and generate use it; the lean decoder (lowbit.runtime.decode) keeps the same
format in static buffers.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from lowbit.errors import LowbitError
from lowbit.formats.affine import quantize_symmetric_int8, range_scale

KV_KINDS = ("none", "int8", "fp8")
_FP8 = torch.float8_e4m3fn
_QMAX = {"int8": 127.0, "fp8": float(torch.finfo(_FP8).max)}


def check_kind(kind: str, where: str = "kv_cache") -> str:
    if kind not in KV_KINDS:
        raise LowbitError(f"{where}: '{kind}' is not a KV-cache format; use one of {', '.join(KV_KINDS)}")
    return kind


def quantize_kv(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) -> codes (..., head_dim) and scales (..., 1) in fp32."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = range_scale(amax, _QMAX[kind])
    if kind == "int8":
        return quantize_symmetric_int8(xf, scale), scale
    return (xf / scale).to(_FP8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, kind: str, float_bytes: int = 4) -> int:
    per_head = head_dim * float_bytes if kind == "none" else head_dim + 4
    return 2 * n_layers * n_kv_heads * per_head


class QuantizedKVLayer(BaseQuantizedLayer):
    """One attention layer's cache in int8/fp8. `update` returns the dequantized keys and values of
    everything cached so far, the new tokens included, so attention always reads what is stored."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = check_kind(kind)

    def _quantize(self, tensor):
        return quantize_kv(tensor, self.kind)

    def _dequantize(self, q_tensor):
        return dequantize_kv(*q_tensor, self.dtype)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = self.values = torch.empty(0, dtype=key_states.dtype, device=key_states.device)  # unused
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        new_k, new_v = self._quantize(key_states), self._quantize(value_states)
        if self._quantized_keys is None:
            self._quantized_keys, self._quantized_values = new_k, new_v
        else:
            self._quantized_keys = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self._quantized_keys, new_k))
            self._quantized_values = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self._quantized_values, new_v))
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    @property
    def nbytes(self) -> int:
        if self._quantized_keys is None:
            return 0
        return sum(t.numel() * t.element_size() for pair in (self._quantized_keys, self._quantized_values) for t in pair)


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers are QuantizedKVLayer: pass as past_key_values=."""

    def __init__(self, kind: str, config=None) -> None:
        check_kind(kind)
        if kind == "none":
            raise LowbitError("kv_cache 'none' needs no quantized cache; use the model's default cache")
        if config is not None:
            check_architecture(config)
        self.kind = kind
        super().__init__(layers=None, layer_class_to_replicate=lambda: QuantizedKVLayer(kind))

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def check_architecture(config) -> None:
    """Refuse models whose attention is not a plain per-layer K/V cache (clear error, not wrong output)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    unsupported = types - {"full_attention", "sliding_attention"}
    if unsupported:
        raise LowbitError(f"kv_cache: model type '{getattr(text, 'model_type', '?')}' has layer types "
                          f"{', '.join(sorted(unsupported))} that keep state other than keys and values; "
                          f"KV-cache quantization supports full and sliding-window attention only; fix: use kv_cache none")
    if getattr(text, "kv_lora_rank", None):
        raise LowbitError(f"kv_cache: model type '{getattr(text, 'model_type', '?')}' caches a compressed latent (MLA), "
                          f"not per-head keys and values; fix: use kv_cache none")


def attach(model, kind: str) -> None:
    """Make every forward pass of `model` that brings no cache of its own use a fresh quantized KV
    cache (so whole-sequence evaluation reads keys and values as stored), and make lowbit's generation
    (`cache_kwargs`, the lean loop) use the same format. kind "none" detaches."""
    check_kind(kind)
    if kind != "none":
        check_architecture(model.config)
    old = _ATTACHED.pop(model, None)
    if old is not None:
        old[1].remove()
    if kind == "none":
        return

    def inject(module, args, kwargs):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = QuantizedKVCache(kind, module.config)
            kwargs["use_cache"] = True
        return args, kwargs

    _ATTACHED[model] = (kind, model.register_forward_pre_hook(inject, with_kwargs=True))


# module -> (format, its forward pre-hook); weak, so a dropped model takes its entry with it
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kv_of(model) -> str:
    """The KV-cache format attached to `model` ("none" when none is)."""
    entry = _ATTACHED.get(model)
    return "none" if entry is None else entry[0]


def cache_kwargs(model) -> dict:
    """Extra generate() arguments for the model's attached KV format (none: nothing)."""
    kind = kv_of(model)
    return {} if kind == "none" else {"cache": QuantizedKVCache(kind, model.config)}
