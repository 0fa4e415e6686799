"""The quantize verb: decide each Linear module's spec from the recipe, then swap in QLinear."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.affine import torch_dtype
from lowbit.formats.spec import QuantSpec
from lowbit.model.qlinear import QLinear, prepare_model, share_embedding
from lowbit.recipe import Recipe

Progress = Callable[[str, int, int], None]  # (module name, index, total)


@dataclass(frozen=True)
class ModulePlan:
    name: str
    in_features: int
    out_features: int
    spec: QuantSpec | None  # None: kept in high precision
    note: str = ""  # e.g. why the group size changed


def fit_group_size(spec: QuantSpec, in_features: int, fallback: str, module: str) -> tuple[QuantSpec, str]:
    """Apply the recipe's policy for rows the group size does not divide."""
    if spec.granularity != "group" or in_features % spec.group_size == 0:
        return spec, ""
    if fallback == "shrink":
        g = spec.group_size
        while g > 1 and in_features % g:
            g //= 2
        if in_features % g == 0 and g >= 8:
            return spec.with_group_size(g), f"group {spec.group_size} does not divide {in_features}; used {g}"
    raise LowbitError(
        f"module {module}: in_features {in_features} is not divisible by group_size {spec.group_size}; "
        f"fix: pick a group size that divides {in_features} (e.g. {_divisors_hint(in_features)}), "
        f"set the recipe's group_fallback: shrink, or ignore this module")


def _divisors_hint(n: int) -> str:
    ds = [g for g in (256, 128, 64, 32, 16) if n % g == 0]
    return ", ".join(map(str, ds[:3])) or "per-channel granularity"


def plan_linear(name: str, in_features: int, out_features: int, recipe: Recipe) -> ModulePlan:
    spec = recipe.spec_for(name)
    if spec is None:
        return ModulePlan(name, in_features, out_features, None)
    spec, note = fit_group_size(spec, in_features, recipe.group_fallback, name)
    return ModulePlan(name, in_features, out_features, spec, note)


def plan_model(model: nn.Module, recipe: Recipe) -> list[ModulePlan]:
    """A plan for every nn.Linear in the model, in module order (works on meta-device skeletons)."""
    return [plan_linear(n, m.in_features, m.out_features, recipe)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)]


CHUNK = 1 << 22  # elements per step when a whole-tensor temporary would be large


def check_finite(name: str, w: torch.Tensor) -> None:
    flat = w.reshape(-1)
    bad = sum((~torch.isfinite(flat[i:i + CHUNK])).sum().item() for i in range(0, flat.numel(), CHUNK))
    if bad:
        raise LowbitError(
            f"module {name}: weight has {bad} NaN/Inf value(s) of {w.numel()}; the source checkpoint is damaged; "
            f"fix: re-export the model from a good copy (quantizing it would only hide the damage)")


def fits_dtype(t: torch.Tensor, dt: torch.dtype) -> bool:
    """Whether t can be stored in dt: the cast stays finite, or t was not finite to begin with.
    Checked in chunks, so a large tensor needs no whole-size temporary."""
    flat = t.detach().reshape(-1)
    parts = [flat[i:i + CHUNK] for i in range(0, flat.numel(), CHUNK)]
    return all(bool(torch.isfinite(c.to(dt)).all()) for c in parts) or not all(bool(torch.isfinite(c).all()) for c in parts)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def round_kept(model: nn.Module, keep_dtype: str, skip: Iterable[str] = ()) -> None:
    """Round every float parameter outside QLinear through keep_dtype, as the artifact stores them.

    This makes the in-memory quantized model compute exactly what the reloaded artifact computes.
    A tensor that does not fit the dtype (overflow) stays as it is, and is stored that way.
    """
    dt = torch_dtype(keep_dtype)
    skip = set(skip)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in skip or not p.is_floating_point() or p.dtype == dt:
                continue
            if not fits_dtype(p, dt):
                continue
            if not p.is_contiguous():
                p.copy_(p.to(dt).to(p.dtype))
                continue
            flat = p.detach().view(-1)  # in chunks: a large embedding's temporaries stay small
            for i in range(0, flat.numel(), CHUNK):
                flat[i:i + CHUNK] = flat[i:i + CHUNK].to(dt).to(p.dtype)


def quantize_model(model: nn.Module, recipe: Recipe, progress: Progress | None = None) -> list[ModulePlan]:
    """Swap every planned nn.Linear for a QLinear, in place. Returns the plan that was applied.

    All checks (group sizes, NaN/Inf weights) run before any module is touched, so a bad input
    leaves the model as it was.
    """
    plans = plan_model(model, recipe)
    todo = [p for p in plans if p.spec is not None]
    for p in todo:
        check_finite(p.name, model.get_submodule(p.name).weight.detach())
    if not todo:
        raise LowbitError(f"recipe '{recipe.name}': its targets/ignore patterns select no Linear module of this model; "
                          f"fix the patterns (module names look like {_example_names(model)})")
    for i, p in enumerate(todo):
        if progress:
            progress(p.name, i, len(todo))
        linear = model.get_submodule(p.name)
        set_submodule(model, p.name, QLinear.from_linear(linear, p.spec))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        if isinstance(getattr(model, "lm_head", None), QLinear):
            # one matrix: a per-row (INT8/FP8) head serves the embedding lookups too; any other head
            # format leaves the float embedding table on its own. Either way the artifact must not re-tie.
            share_embedding(model)
            config.tie_word_embeddings = False
    round_kept(model, recipe.keep_dtype)
    prepare_model(model)
    if recipe.kv_cache != "none":
        from lowbit.model.kvcache import attach  # transformers' cache classes: imported only when used

        attach(model, recipe.kv_cache)
    return plans


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:2]
    return ", ".join(names) or "(no nn.Linear found)"


def plans_to_json(plans: list[ModulePlan]) -> dict:
    return {p.name: {"in_features": p.in_features, "out_features": p.out_features,
                     "spec": None if p.spec is None else p.spec.to_dict(), "note": p.note} for p in plans}


def plans_from_json(data: dict) -> list[ModulePlan]:
    return [ModulePlan(name, d["in_features"], d["out_features"],
                       None if d["spec"] is None else QuantSpec.from_dict(d["spec"], f"lowbit.json module {name}"),
                       d.get("note", "")) for name, d in data.items()]

