"""Load models: a float baseline (HF folder, GGUF, bundled name), a lowbit artifact, or a float
checkpoint quantized while it streams in (the `load_in_4bit` path).

The artifact and streaming paths build the model skeleton with empty (meta) weights and fill it one
tensor at a time (artifacts through safetensors' memory map, float checkpoints through plain reads of
one tensor at a time), so the full float model is never held in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model import sources
from lowbit.model.qlinear import QLinear, prepare_model, share_embedding
from lowbit.model.st_reader import iter_tensors
from lowbit.model.quantize import check_finite, plan_model, plans_from_json, set_submodule
from lowbit.recipe import Recipe

ARTIFACT_FORMAT = "lowbit"
ARTIFACT_FORMAT_VERSION = 1
IMATRIX_FILE = "imatrix.safetensors"


def _libc_trim():
    """glibc keeps freed medium-size blocks (up to its 32 MB dynamic mmap threshold) in the heap, so a
    stream of same-size weight tensors ratchets RSS up; malloc_trim hands them back. The streaming
    load's peak is measured by benchmarks/load_memory.py. A no-op where glibc is absent."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
        return lambda: trim(0)
    except (OSError, AttributeError):
        return lambda: None


release_memory = _libc_trim()


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    source: dict  # name, kind, path, sha256 of the original weights
    folder: Path  # the folder the weights were read from
    meta: dict = field(default_factory=dict)  # lowbit.json for artifacts

    def __post_init__(self) -> None:
        # lowbit.save(model) needs both; keep them with the model object.
        self.model.lowbit_source = self.source
        self.model.lowbit_tokenizer = self.tokenizer


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise LowbitError(f"tokenizer in {folder}: could not be loaded ({type(e).__name__}: {e}); "
                          f"fix: save the tokenizer files (tokenizer.json, tokenizer_config.json) into the folder") from None


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, progress=None) -> Loaded:
    """Load any supported model. Float sources come back as float models; artifacts as quantized ones."""
    src = sources.resolve(name_or_path)
    if src.kind == "lowbit":
        return load_artifact(src.path)
    if src.kind == "compressed-tensors":  # decompressed to float for evaluation
        from lowbit.export.compressed import load_compressed

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
    return Loaded(model, load_tokenizer(folder), {**src.describe(), "sha256": digest}, folder)


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


# -- skeletons filled tensor by tensor -------------------------------------------------------------
def empty_model(folder: Path, dtype: torch.dtype, config_overrides: dict | None = None) -> nn.Module:
    """The model of folder/config.json with parameters on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise LowbitError(f"config file {folder / 'config.json'}: could not be read by transformers ({e})") from None
    for k, v in (config_overrides or {}).items():
        setattr(config, k, v)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> bool:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        return False
    return True


def _finish(model: nn.Module, where: Path) -> nn.Module:
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise LowbitError(f"weights in {where}: {len(missing)} tensor(s) are missing, e.g. {', '.join(missing[:3])}; "
                          f"the files are incomplete; fix: save the model again")
    return model


def load_artifact(folder: Path, dtype: torch.dtype = torch.float32) -> Loaded:
    from safetensors import safe_open

    meta_path = folder / sources.ARTIFACT_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"artifact file {meta_path}: cannot be read as JSON ({e}); the artifact is damaged; quantize again") from None
    if meta.get("format") != ARTIFACT_FORMAT or not isinstance(meta.get("modules"), dict):
        raise LowbitError(f"artifact file {meta_path}: field 'format' must be '{ARTIFACT_FORMAT}' with a 'modules' table; "
                          f"this is not a lowbit artifact")
    if meta.get("format_version", 0) > ARTIFACT_FORMAT_VERSION:
        raise LowbitError(f"artifact file {meta_path}: field 'format_version' is {meta['format_version']}, newer than this "
                          f"lowbit reads ({ARTIFACT_FORMAT_VERSION}); fix: upgrade lowbit")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise LowbitError(f"artifact {folder}: model.safetensors is missing; the artifact is incomplete; quantize again")
    sources.check_safetensors(weights)
    plans = plans_from_json(meta["modules"])
    model = empty_model(folder, dtype)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for p in plans:
            if p.spec is None:
                continue
            prefix = p.name + "."
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix) and k != prefix + "bias"}
            bias = f.get_tensor(prefix + "bias").to(dtype) if prefix + "bias" in keys else None
            if "qdata" not in tensors:
                raise LowbitError(f"artifact {weights}: tensors of module {p.name} are missing; the artifact is damaged; quantize again")
            set_submodule(model, p.name, QLinear(p.in_features, p.out_features, p.spec, tensors, bias))
            keys -= {prefix + n for n in tensors} | {prefix + "bias"}
        if meta.get("embedding") == "lm_head" and not share_embedding(model):
            raise LowbitError(f"artifact file {meta_path}: field 'embedding' says the embeddings are the head's rows, "
                              f"but the head is not a per-row INT8/FP8 module; the artifact is damaged; quantize again")
        for k in keys:
            t = f.get_tensor(k)
            _set_tensor(model, k, t.to(dtype) if t.is_floating_point() else t)
    model.lowbit_plan = plans
    model.lowbit_recipe = Recipe.from_dict(meta["recipe"], f"artifact file {meta_path}: field 'recipe'")
    prepare_model(model)
    if model.lowbit_recipe.kv_cache != "none":  # the recipe chose the KV-cache format this artifact runs with
        from lowbit.runtime.kvcache import attach

        attach(model, model.lowbit_recipe.kv_cache)
    if (folder / IMATRIX_FILE).is_file():
        from safetensors.torch import load_file

        sources.check_safetensors(folder / IMATRIX_FILE)
        model.lowbit_imatrix = load_file(str(folder / IMATRIX_FILE))
    if meta.get("calibration"):
        model.lowbit_calibration = meta["calibration"]
    return Loaded(_finish(model, weights), load_tokenizer(folder), meta.get("source", {}), folder, meta)


def load_streaming(name_or_path: str | Path, recipe: Recipe, compute_dtype: torch.dtype = torch.bfloat16,
                   progress=None) -> Loaded:
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
                    _set_tensor(model, key, t.to(compute_dtype))
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
                _set_tensor(model, key, t.to(compute_dtype) if t.is_floating_point() else t)
            del t
    model.lowbit_plan = list(plans.values())
    model.lowbit_recipe = recipe
    prepare_model(model)
    return Loaded(_finish(model, folder), load_tokenizer(folder), {**src.describe(), "sha256": digest}, folder)
