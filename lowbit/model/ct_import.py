"""Import a compressed-tensors checkpoint (llm-compressor's format, and lowbit's own export) as a float
model for evaluation: each quantized weight is decompressed by the compressed-tensors library.
Writing that format is lowbit.exporters.compressed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model import sources
from lowbit.model.handle import Model
from lowbit.datafile import REGEX_TIMEOUT_S, user_regex
from lowbit.model.skeleton import empty_model, finish_model, load_tokenizer, put_tensor


def _matches(target: str, name: str, module: nn.Module, where: str) -> bool:
    if target.startswith("re:"):  # a pattern from the checkpoint's config: checked, and run under a timeout
        try:
            return user_regex(target[3:], where).match(name, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise LowbitError(f"{where}: regular expression {target[3:][:80]!r} took more than {REGEX_TIMEOUT_S:g} s "
                              f"on module name {name!r}; fix: simplify the pattern") from None
    return target == name or target == type(module).__name__


def load_compressed(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A compressed-tensors checkpoint as a float model (each quantized weight decompressed by the
    compressed-tensors library), for lowbit's evaluation harness. Works for asymmetric
    pack-quantized checkpoints too, which transformers 5.24 with compressed-tensors 0.20 cannot load."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise LowbitError(f"model folder {folder}: is a compressed-tensors checkpoint and the compressed-tensors package "
                          f"is not installed; fix: pip install compressed-tensors==0.20.0")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    files = sources.check_hf_folder(folder)
    cfg_file = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        qconfig = QuantizationConfig.model_validate(config.quantization_config)
    except Exception as e:
        raise LowbitError(f"config file {cfg_file}: field 'quantization_config' is not a valid compressed-tensors config "
                          f"({type(e).__name__}: {e}); fix: re-export the checkpoint") from None
    del config.quantization_config
    model = empty_model(folder, dtype, config)
    targets = [(t, sch) for sch in qconfig.config_groups.values() for t in sch.targets]
    plan = {}
    for name, mod in model.named_modules():
        where = f"config file {cfg_file}: field 'quantization_config'"
        if not isinstance(mod, nn.Linear) or any(_matches(i, name, mod, where) for i in qconfig.ignore or []):
            continue
        hit = next((sch for t, sch in targets if _matches(t, name, mod, where)), None)
        if hit is not None and hit.weights is not None:
            plan[name] = hit
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                owner, _, attr = key.rpartition(".")
                t = f.get_tensor(key)
                if owner in plan and attr != "bias":  # scales in float32: decompression computes in their dtype
                    tensors.setdefault(owner, {})[attr] = t.float() if attr.endswith("_scale") else t
                else:
                    put_tensor(model, key, t.to(dtype) if t.is_floating_point() else t, path)
    for name, sch in plan.items():
        sd = tensors.get(name)
        if not sd:
            raise LowbitError(f"weights in {folder}: the quantized tensors of module {name} are missing; "
                              f"the checkpoint is incomplete; fix: export it again")
        fmt = getattr(sch.format or qconfig.format, "value", sch.format or qconfig.format)
        try:
            w = BaseCompressor.get_value_from_registry(str(fmt)).decompress(sd, sch)["weight"]
        except Exception as e:
            raise LowbitError(f"weights in {folder}: module {name} could not be decompressed as '{fmt}' "
                              f"({type(e).__name__}: {e}); the checkpoint is damaged or of an unsupported format") from None
        put_tensor(model, name + ".weight", w.to(dtype), folder)
    source = {"name": folder.name, "kind": "compressed-tensors", "path": str(folder), "sha256": sources.sha256_memo(files)}
    return Model(finish_model(model, folder), load_tokenizer(folder), source, folder)
