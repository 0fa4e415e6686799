"""lowbit.Model: one handle for a model and everything lowbit knows about it.

load, quantize, save, evaluate, bench, export, generate and the CLI pass this object around. The
nn.Module holds only what computes; the handle holds the rest: the tokenizer, where the weights came
from, the quantization plan and recipe, and what calibration recorded. Nothing is stored as extra
attributes on the module, so a module given to another library carries no hidden contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.recipe import Recipe


@dataclass(eq=False)
class Model:
    module: nn.Module
    tokenizer: Any = None
    source: dict = field(default_factory=dict)  # name, kind, path, sha256 of the original float weights
    folder: Path | None = None  # the folder the weights were read from
    meta: dict = field(default_factory=dict)  # lowbit.json, when loaded from an artifact
    plan: list | None = None  # ModulePlan per Linear, once quantized
    recipe: Recipe | None = None  # the recipe it was quantized with (algorithm = the method used)
    imatrix: dict | None = None  # module name -> mean x**2 per input channel, from calibration
    calibration: dict | None = None  # method, options, data statistics, fallbacks

    def __call__(self, *args, **kwargs):
        """Run the module (for example `model(ids).logits`)."""
        return self.module(*args, **kwargs)

    @property
    def config(self):
        return self.module.config

    @property
    def quantized(self) -> bool:
        return self.plan is not None

    @property
    def is_artifact(self) -> bool:
        return bool(self.meta)

    @property
    def name(self) -> str:
        """An artifact is named by its folder (its source names the float model it came from)."""
        if self.meta and self.folder is not None:
            return self.folder.name
        return self.source.get("name") or (self.folder.name if self.folder is not None else type(self.module).__name__)

    @property
    def kv_cache(self) -> str:
        """The KV-cache format every forward pass and generation of this model uses (none, int8, fp8)."""
        from lowbit.model.kvcache import kv_of

        return kv_of(self.module)

    @kv_cache.setter
    def kv_cache(self, kind: str) -> None:
        from lowbit.model.kvcache import attach

        attach(self.module, kind)

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.module)

    def need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise LowbitError(f"{what}: the model has no tokenizer; fix: load it with lowbit.load (which keeps it), or "
                              f"wrap the module as lowbit.Model(module, tokenizer=AutoTokenizer.from_pretrained(folder))")
        return self.tokenizer


def as_model(model: Model | nn.Module, tokenizer=None) -> Model:
    """The handle of `model` (an nn.Module is wrapped; a tokenizer given here fills a missing one)."""
    if isinstance(model, Model):
        if tokenizer is not None:
            model.tokenizer = tokenizer
        return model
    if isinstance(model, nn.Module):
        return Model(model, tokenizer)
    raise LowbitError(f"expected a lowbit.Model or a torch nn.Module, got {type(model).__name__}; "
                      f"fix: lowbit.load(path) gives a lowbit.Model")


def weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers in memory, each storage counted once (tied embeddings share
    one); a QLinear counts what it holds now (QLinear.memory_bytes: kernel tensors, not qdata twice)."""
    from lowbit.model.qlinear import QLinear

    qlinears = [m for m in module.modules() if isinstance(m, QLinear)]
    inside = {id(t) for m in qlinears for t in [*m._buffers.values(), *m._parameters.values()] if t is not None}
    seen, total = set(), sum(m.memory_bytes for m in qlinears)
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if id(t) not in inside and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
