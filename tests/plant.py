"""Regressions planted on purpose, each aimed at one thing the gate should see: the tests and
benchmarks/gate_guard.py use the same ones. Each returns a handle to undo it where that matters.

- crushed layer: one Linear requantized to few bits (built through a recipe override);
- structure rows: the output-head logits of the tokens made only of JSON punctuation scaled;
- rotary past P: positions from P on stretched, so only long inputs see wrong angles;
- old KV entries crushed: keys and values more than `window` positions behind the newest rounded to
  a few bits (what a broken cache compression would do): short inputs never see it.
"""

from __future__ import annotations

import torch
from torch import nn

JSON_PUNCT = set('{}[]:,"')


def structure_token_ids(tok) -> list[int]:
    return [i for t, i in tok.get_vocab().items()
            if (text := tok.convert_tokens_to_string([t]).strip()) and set(text) <= JSON_PUNCT]


def scale_structure_rows(handle, factor: float) -> int:
    """Scale the head's logits of JSON-punctuation tokens by `factor`, in whatever form the head is
    held: a float Linear (untied first, so embeddings keep their rows) or a quantized head's per-row
    kernel scales (the embedding lookups read the stored scales, which are left alone). Both the
    torch path and the native decode step read what is changed here. Returns the rows changed."""
    from lowbit.model.qlinear import QLinear

    rows = structure_token_ids(handle.tokenizer)
    head = handle.module.lm_head
    with torch.no_grad():
        if isinstance(head, QLinear):
            if head.plan is None:
                head.prepare()
            if head.plan.name != "int8pack":
                raise ValueError(f"scale_structure_rows: a {head.plan.name} head is not handled")
            head._packed["s"] = head._packed["s"].clone()
            head._packed["s"][rows] *= factor
        else:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            head.weight[rows] *= factor
    return len(rows)


def stretch_rotary_past(handle, start: int, factor: float):
    """Positions >= start become start + (p - start) * factor in the rotary embedding (transformers'
    forward and generate): text within the first `start` tokens is untouched."""
    rot = handle.module.model.rotary_emb

    def pre(_mod, args, kwargs):
        x, pos = args[0], args[1] if len(args) > 1 else kwargs["position_ids"]
        pos = pos.float()
        pos = torch.where(pos >= start, start + (pos - start) * factor, pos)
        return (x, pos), {}

    return rot.register_forward_pre_hook(pre, with_kwargs=True)


def _crush(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest to `bits` bits, one scale per row of the last dimension."""
    levels = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / max(levels, 1)
    return (x / s).round().clamp(-levels, levels) * s


def crush_old_kv(handle, window: int, bits: int) -> list:
    """Keys and values of positions more than `window` behind the last one of the input rounded to
    `bits` bits (the k_proj / v_proj outputs; transformers' forward and generate's prefill)."""
    hooks = []

    def post(_mod, _inp, out):
        t = out.shape[-2]
        if t <= window:
            return out
        out = out.clone()
        out[..., : t - window, :] = _crush(out[..., : t - window, :].float(), bits).to(out.dtype)
        return out

    for layer in handle.module.model.layers:
        for name in ("k_proj", "v_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(post))
    return hooks


def crushed_layer_recipe(base: str, module: str, bits: int):
    """`base` preset with one module at `bits` bits per channel."""
    from lowbit.recipe import PRESETS, Recipe

    d = PRESETS[base].to_dict()
    d["name"] = f"{base}-{module.split('.')[-1]}-{bits}bit"
    d["overrides"] = list(d.get("overrides") or []) + [
        {"match": module, "scheme": {"kind": "int", "bits": bits, "granularity": "channel"}}]
    return Recipe.from_dict(d)
