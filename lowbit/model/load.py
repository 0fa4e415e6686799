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
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False)
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
    check_checkpoint(src.path, files)
    marker = src.path / "lowbit-source.json"
    if marker.is_file():  # one of our cached GGUF conversions: its identity is the GGUF's hash
        try:
            return src.path, str(json.loads(marker.read_text())["sha256"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LowbitError(f"source marker {marker}: is not lowbit's JSON record of a GGUF conversion ({e}); "
                              f"fix: delete {src.path} and convert the GGUF again") from None
    return src.path, sources.sha256_memo(files)


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def check_checkpoint(folder: Path, files: list[Path]) -> None:
    """Every tensor the model's config implies is in the files with its shape and a float dtype, and
    nothing else is: transformers would otherwise fill a missing weight with random values, silently.
    Read from the safetensors headers and a meta-device skeleton, so no weight is loaded."""
    from lowbit.model.st_reader import read_header

    found: dict[str, tuple[list, str, Path]] = {}
    for f in files:
        for name, info in read_header(f)[1].items():
            if name != "__metadata__":
                found[name] = (list(info.get("shape", [])), str(info.get("dtype")), f)
    if any(n.endswith((".qdata", ".weight_packed", ".absmax")) for n in found) and \
            not sources.is_compressed_tensors(folder):
        raise LowbitError(f"model folder {folder}: its weights are quantized tensors (e.g. "
                          f"{next(n for n in found if n.endswith(('.qdata', '.weight_packed', '.absmax')))}) but the "
                          f"folder has no {sources.ARTIFACT_FILE}; it is a damaged lowbit artifact; fix: restore "
                          f"{sources.ARTIFACT_FILE}, or quantize the float model again")
    module = empty_model(folder, torch.float32)
    want = {}
    for name, t in module.state_dict(keep_vars=True).items():
        want.setdefault(name, t)
    tied = {n for n in want if n == "lm_head.weight"} if getattr(module.config, "tie_word_embeddings", False) else set()
    persistent = set()
    for mname, mod in module.named_modules():
        prefix = mname + "." if mname else ""
        persistent |= {prefix + n for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set}
    where = f"model folder {folder}"
    missing = [n for n, t in want.items() if n not in found and n not in tied and (t.is_meta or n in persistent)]
    if missing:
        raise LowbitError(f"{where}: {len(missing)} tensor(s) the config needs are not in the weights, e.g. "
                          f"{', '.join(missing[:3])}; transformers would fill them with random values; fix: save the "
                          f"complete checkpoint (or the config that matches these weights)")
    extra = [n for n in found if n not in want]
    if extra:
        raise LowbitError(f"{where}: {len(extra)} tensor(s) in the weights are not part of the model its config "
                          f"describes, e.g. {', '.join(extra[:3])}; fix: pass the config.json saved with these weights")
    for name, (shape, dtype, f) in found.items():
        t = want[name]
        if tuple(shape) != tuple(t.shape):
            raise LowbitError(f"safetensors file {f}: tensor {name} has shape {tuple(shape)}, but config.json implies "
                              f"{tuple(t.shape)}; fix: pass the config.json saved with these weights")
        if t.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise LowbitError(f"safetensors file {f}: tensor {name} is stored as {dtype}, not a float type; it is not "
                              f"a float checkpoint; fix: pass the original float weights")


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
