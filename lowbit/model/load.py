"""Load models: a float baseline (HF folder, GGUF, bundled name), a lowbit artifact, or a float
checkpoint quantized while it streams in (the `load_in_4bit` path).

The artifact and streaming paths build the model skeleton with empty (meta) weights and fill it one
tensor at a time (artifacts through safetensors' memory map, float checkpoints through plain reads of
one tensor at a time), so the full float model is never held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model import sources
from lowbit.model.handle import Model
from lowbit.model.qlinear import QLinear, prepare_model, share_embedding
from lowbit.model.quantize import check_finite, plan_model, set_submodule
from lowbit.model.skeleton import empty_model, finish_model, load_tokenizer, release_memory, set_tensor
from lowbit.model.st_reader import iter_tensors
from lowbit.recipe import Recipe


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, progress=None) -> Model:
    """Load any supported model. Float sources come back as float models; artifacts as quantized ones."""
    src = sources.resolve(name_or_path)
    if src.kind == "lowbit":
        from lowbit.model.artifact import load_artifact

        return load_artifact(src.path)
    if src.kind == "compressed-tensors":  # decompressed to float for evaluation
        from lowbit.model.ct_import import load_compressed

        return load_compressed(src.path, dtype)
    folder, digest = float_folder(src, progress)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"model folder {folder}: transformers could not build the model ({type(e).__name__}: {e}); "
                          f"fix: check config.json matches the weights") from None
    model.eval()
    return Model(model, load_tokenizer(folder), {**src.describe(), "sha256": digest}, folder)


def float_folder(src: sources.ModelSource, progress=None) -> tuple[Path, str]:
    """The safetensors folder of a float source and the sha256 identifying its weights."""
    if src.kind in ("gguf", "bundled"):
        return sources.converted_folder(src, progress)
    if src.kind in ("lowbit", "compressed-tensors"):
        raise LowbitError(f"model folder {src.path}: is already a quantized {src.kind} checkpoint; "
                          f"pass the original float model instead")
    files = sources.check_hf_folder(src.path)
    marker = src.path / "lowbit-source.json"
    if marker.is_file():  # one of our cached GGUF conversions: its identity is the GGUF's hash
        return src.path, json.loads(marker.read_text())["sha256"]
    return src.path, sources.sha256_memo(files)


def load_streaming(name_or_path: str | Path, recipe: Recipe, compute_dtype: torch.dtype = torch.bfloat16,
                   progress=None) -> Model:
    """Quantize a float checkpoint while it loads: one tensor in memory at a time (bitsandbytes-style)."""
    src = sources.resolve(name_or_path)
    folder, digest = float_folder(src, progress)
    model = empty_model(folder, compute_dtype)
    plans = {p.name: p for p in plan_model(model, recipe)}
    todo = {p.name + ".weight": p for p in plans.values() if p.spec is not None}
    todo_modules = {p.name for p in todo.values()}
    tied_head = None  # a tied checkpoint stores the head only as the embedding table
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in todo:
        emb = model.get_input_embeddings()
        tied_head = next(n for n, m in model.named_modules() if m is emb) + ".weight"
    for path in sources.weight_files(folder):
        sources.check_safetensors(path)
        for key, t in iter_tensors(path):  # plain reads: one float tensor alive at a time
            if key == tied_head:
                plan = todo["lm_head.weight"]
                check_finite(plan.name, t)
                set_submodule(model, "lm_head", QLinear.from_weight(t, plan.spec))
                if not share_embedding(model):
                    set_tensor(model, key, t.to(compute_dtype))
                model.config.tie_word_embeddings = False
                del t
                release_memory()
                continue
            plan = todo.get(key)
            if plan is not None:
                check_finite(plan.name, t)
                old = model.get_submodule(plan.name)
                bias = old.bias if old.bias is not None and not old.bias.is_meta else None
                set_submodule(model, plan.name, QLinear.from_weight(t, plan.spec, bias))
                del t
                release_memory()
                continue
            elif key.endswith(".bias") and key[:-5] in todo_modules and isinstance(model.get_submodule(key[:-5]), QLinear):
                # the weight came first: the QLinear is in place, give it its bias
                model.get_submodule(key[:-5]).bias = nn.Parameter(t.to(compute_dtype), requires_grad=False)
            else:
                set_tensor(model, key, t.to(compute_dtype) if t.is_floating_point() else t)
            del t
    prepare_model(model)
    return Model(finish_model(model, folder), load_tokenizer(folder), {**src.describe(), "sha256": digest}, folder,
                 plan=list(plans.values()), recipe=recipe)
