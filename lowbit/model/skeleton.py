"""A transformers model built with empty (meta) weights and filled one tensor at a time.

Loading an artifact, streaming a float checkpoint, calibrating block by block and importing a
compressed-tensors folder all build the model this way, so the full float model is never held in
memory beside the tensors being read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError


def _libc_trim():
    """glibc keeps freed medium-size blocks (up to its 32 MB dynamic mmap threshold) in the heap, so a
    stream of same-size weight tensors ratchets RSS up; malloc_trim hands them back. A no-op where
    glibc is absent."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
        return lambda: trim(0)
    except (OSError, AttributeError):
        return lambda: None


release_memory = _libc_trim()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise LowbitError(f"tokenizer in {folder}: could not be loaded ({type(e).__name__}: {e}); "
                          f"fix: save the tokenizer files (tokenizer.json, tokenizer_config.json) into the folder") from None


def empty_model(folder: Path, dtype: torch.dtype, config=None) -> nn.Module:
    """The model of folder/config.json (or of `config`) with parameters on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is None:
        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as e:
            raise LowbitError(f"config file {folder / 'config.json'}: could not be read by transformers ({e})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Put `value` in place of the parameter or buffer called `name` (state-dict naming); False if there is none."""
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


def put_tensor(model: nn.Module, name: str, value: torch.Tensor, where: Path) -> None:
    """set_tensor for tensors read from a file: a name the model does not have, or a shape other than
    the one its config implies, is refused (naming the file) instead of ignored or broadcast."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
        old = mod._parameters[attr] if attr in mod._parameters else mod._buffers[attr]
    except (AttributeError, KeyError):
        raise LowbitError(f"weights in {where}: tensor {name} is not part of the model its config.json describes; "
                          f"the files do not belong together; fix: save the model again") from None
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise LowbitError(f"weights in {where}: tensor {name} has shape {tuple(value.shape)}, but config.json implies "
                          f"{tuple(old.shape)}; the files do not belong together; fix: save the model again")
    set_tensor(model, name, value)


def finish_model(model: nn.Module, where: Path) -> nn.Module:
    """Re-tie embeddings and refuse a model with any tensor still empty (naming the files it came from)."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise LowbitError(f"weights in {where}: {len(missing)} tensor(s) are missing, e.g. {', '.join(missing[:3])}; "
                          f"the files are incomplete; fix: save the model again")
    return model
