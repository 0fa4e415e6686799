"""The model without loading its weights (GGUF tensor tables, safetensors headers, lowbit.json), and
the weight bytes a recipe would give it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lowbit.errors import LowbitError
from lowbit.recipe import Recipe


# ---- the model, without loading it -------------------------------------------------------------

class Tensor(NamedTuple):
    name: str  # as a module name recipes match on ("model.layers.0.mlp.down_proj", "lm_head")
    numel: int
    ndim: int
    row: int  # the length of one row (a Linear's in_features); 0 for a 1-D tensor


@dataclass
class ModelInfo:
    name: str
    kind: str
    path: Path
    tensors: list[Tensor] | None  # None: not counted
    counted_from: str
    arch: str | None = None
    file_bytes: int | None = None  # what the model's files hold now (an artifact's or GGUF's own size)
    source_names: tuple[str, ...] = ()  # names a registry run may give this model as its baseline
    source_paths: tuple[str, ...] = ()
    float_model: str | None = None  # the model to quantize from: itself, or for an artifact the one it names

    @property
    def parameters(self) -> int | None:
        return None if self.tensors is None else sum(t.numel for t in self.tensors)


# GGUF tensor names -> the Hugging Face module names recipes match on
_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _hf_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base == "output":
        return "lm_head"
    if base == "token_embd":
        return "model.embed_tokens"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _GGUF_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}"
    return base


def _gguf_table(path: Path) -> tuple[list[Tensor], str | None]:
    """The tensor table and architecture of a GGUF file, read once (the checks of sources.check_gguf,
    on the same reader: the magic bytes, and every tensor inside the file)."""
    from gguf import GGUFReader

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
        reader = GGUFReader(str(path))
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file ({size} bytes)")
        arch = reader.fields.get("general.architecture")
        # GGUF lists dimensions innermost first: shape[0] is the row length
        tensors = [Tensor(_hf_name(t.name), int(t.n_elements), len(t.shape), int(t.shape[0]) if len(t.shape) > 1 else 0)
                   for t in reader.tensors]
        return tensors, (str(arch.contents()) if arch is not None else None)
    except OSError as e:
        raise LowbitError(f"GGUF file {path}: cannot be read ({e.strerror}); check the path and permissions") from None
    except Exception as e:  # the reader raises many types on damaged files
        raise LowbitError(f"GGUF file {path}: is truncated or corrupt ({e}); fix: copy or re-export the file again") from None


def _safetensors_table(files: list[Path]) -> list[Tensor]:
    from lowbit.model.st_reader import read_header

    tensors = []
    for f in files:
        for name, info in read_header(f)[1].items():
            tensors.append(_st_tensor(name, info["shape"]))
    return tensors


def _st_tensor(name: str, shape: list[int]) -> Tensor:
    return Tensor(name.removesuffix(".weight"), math.prod(shape), len(shape), shape[-1] if len(shape) > 1 else 0)


def _config_arch(folder: Path) -> str | None:
    try:
        import json

        cfg = json.loads((folder / "config.json").read_text())
        return (cfg.get("architectures") or [cfg.get("model_type")])[0]
    except (OSError, ValueError, AttributeError, IndexError):
        return None


def inspect_model(model: str) -> ModelInfo:
    """What the model is and how many parameters it holds, from its headers (no weights loaded).
    A path that does not exist is a LowbitError naming it and the fix."""
    from lowbit.model import sources

    src = sources.resolve(model)
    names, paths = (src.name,), (() if src.kind == "bundled" else (str(src.path.resolve()),))
    if src.kind in ("bundled", "gguf"):
        gguf_file = sources.gguf_path(src)
        tensors, arch = _gguf_table(gguf_file)
        return ModelInfo(src.name, src.kind, src.path, tensors, "GGUF tensor table", arch,
                         gguf_file.stat().st_size, names, paths, model)
    if src.kind == "hf":
        files = sources.check_hf_folder(src.path)
        return ModelInfo(src.name, src.kind, src.path, _safetensors_table(files), "safetensors headers",
                         _config_arch(src.path), sum(f.stat().st_size for f in files), names, paths, model)
    if src.kind == "lowbit":
        return _artifact_info(src)
    # compressed-tensors: packed shapes do not give a parameter count; report the files' size only
    files = sources.weight_files(src.path)
    return ModelInfo(src.name, src.kind, src.path, None, "a compressed-tensors checkpoint: packed tensors give no "
                     "parameter count", _config_arch(src.path), sum(f.stat().st_size for f in files), names, paths)


def _artifact_info(src) -> ModelInfo:
    """A lowbit artifact: its linear modules from lowbit.json, everything else from the header."""
    from lowbit.exporters.inspect import artifact_summary
    from lowbit.model.artifact import WEIGHTS_FILE
    from lowbit.model.st_reader import read_header

    summary = artifact_summary(src.path)  # checks lowbit.json, the header and the tensors against it
    modules = {row["name"]: row for row in summary["modules"]}
    header = read_header(src.path / WEIGHTS_FILE)[1]
    tensors = [Tensor(name, row["in_features"] * row["out_features"], 2, row["in_features"])
               for name, row in modules.items() if row["bytes"]]
    tensors += [_st_tensor(k, v["shape"]) for k, v in header.items() if k.rpartition(".")[0] not in modules]
    source = summary.get("source") or {}
    names = tuple(n for n in (source.get("name"), src.name) if n)
    paths = (str(src.path.resolve()),)
    # the float model it came from, as lowbit.json names it: only printed in commands, never opened here
    origin = source.get("name") if source.get("kind") == "bundled" else source.get("path")
    return ModelInfo(src.name, "lowbit", src.path, tensors, "lowbit.json and the artifact's safetensors header",
                     None, summary["weight_bytes"], names, paths, origin if isinstance(origin, str) and origin else None)


# ---- sizes -------------------------------------------------------------------------------------

_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


def spec_bits(spec, row: int = 0, group_fallback: str = "shrink") -> float:
    """Bits per weight of a scheme with its scales and zero points, for rows of `row` inputs (0: unknown,
    per-row scales then count as nothing). A group the row length does not divide shrinks to the largest
    power of two that does, as group_fallback "shrink" quantizes it."""
    if spec is None:
        return 16.0
    g = spec.group_size
    while g and row and row % g and group_fallback == "shrink":
        g //= 2  # halved until it divides the row, as the recipe's fallback does
    if spec.kind == "nf4":
        return 4 + (8 / g + 64 / (g * 256) if spec.double_quant else 32 / g)
    scale = 32 if spec.kind.startswith("fp8") else _DTYPE_BITS.get(spec.scale_dtype, 32)
    zero = 0 if spec.symmetric else (8 if spec.zero_domain == "int" else scale)
    per = g if spec.granularity == "group" else (row if spec.granularity == "channel" else 0)
    return spec.bits + ((scale + zero) / per if per else 0.0)


def estimate_bytes(tensors: list[Tensor], recipe: Recipe) -> int:
    """The weight bytes `recipe` would give a model with these tensors. 2-D tensors are Linear weights
    (their recipe scheme), except embeddings: kept in keep_dtype, or, when the head is tied to them
    (no head tensor), the head's quantized rows serve them. 1-D tensors stay in keep_dtype."""
    keep = _DTYPE_BITS[recipe.keep_dtype]
    tied = not any(t.name == "lm_head" for t in tensors)
    head = recipe.spec_for("lm_head")
    bits = 0.0
    for t in tensors:
        if t.ndim < 2:
            b = keep
        elif "embed" in t.name.rsplit(".", 1)[-1] or t.name.endswith("wte"):
            b = spec_bits(head, t.row, recipe.group_fallback) if tied and head is not None else keep
        else:
            b = spec_bits(recipe.spec_for(t.name), t.row, recipe.group_fallback)
        bits += t.numel * b
    return int(bits / 8)


def gguf_bytes(parameters: int, bits: float) -> int:
    return int(parameters * bits / 8)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
