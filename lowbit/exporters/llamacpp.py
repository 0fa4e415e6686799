"""llama.cpp as an outside runtime, through llama-cpp-python: quantize GGUFs with llama.cpp's own
quantizer and read llama.cpp's logits for given token ids.

    baseline_gguf("smollm2-135m")          F32 GGUF of lowbit's FP32 baseline (the same weights lowbit
                                            evaluates: the bundled Q4_1 GGUF dequantized), cached
    llama_quantized("smollm2-135m", "Q4_K_M")  llama.cpp's quantization of that F32 GGUF, cached
    quantize(src, dst, "Q4_K_M", imatrix)  llama_model_quantize; imatrix: GGUF tensor name -> mean x**2
                                            per input channel (llama.cpp's llama_model_imatrix_data list)
    LlamaCppLM(path)(ids[None]).logits     llama.cpp logits, shaped like a transformers model's output,
                                            so lowbit.eval.divergence.compare takes it as a candidate
    open_llama(path, **kw)                 llama_cpp.Llama with the weight-buffer choice below

Weight buffers (LOWBIT_LLAMACPP_BUFTS=auto|plain|extra): llama.cpp repacks weights into "extra" buffer
types for its faster kernels (CPU_REPACK on AVX2/AVX-512, AMX on Intel CPUs with AMX). On an Intel Xeon
with AMX-INT8 (seen in this project, 2026-12-01) the AMX repack of the bundled SmolLM2 GGUF segfaults in
the first decode, the crash of ggml-org/llama.cpp#20824. `auto` (the default) therefore loads weights into
plain CPU buffers on CPUs whose flags include amx_int8 and keeps llama.cpp's default elsewhere; `plain`
and `extra` force one or the other. `plain` only skips repacking: the same weights and the same
quantized dot products (vec_dot), slower prefill.

llama-cpp-python is an optional dependency (it builds llama.cpp from source); a missing install is a
LowbitError with the install command.
"""

from __future__ import annotations

import ctypes
import logging
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lowbit.errors import LowbitError

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36'


BUFTS_ENV = "LOWBIT_LLAMACPP_BUFTS"


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def weight_buffers() -> str:
    """'plain' or 'extra': where llama.cpp puts the weights (see the module docstring)."""
    choice = os.environ.get(BUFTS_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "plain", "extra"):
        raise LowbitError(f"environment variable {BUFTS_ENV}={choice!r}: not one of auto, plain, extra; fix: unset it "
                          "or set it to one of those")
    if choice == "auto":
        return "plain" if _cpu_has_amx() else "extra"
    return choice


def open_llama(path: str | Path, **kwargs):
    """llama_cpp.Llama(model_path=path, **kwargs), with llama.cpp's extra weight buffers off where
    weight_buffers() says 'plain'. llama-cpp-python's constructor has no parameter for it, so the model
    parameters' default is replaced for the duration of the call."""
    llama_cpp = _llama_cpp()
    if weight_buffers() == "extra":
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    raw = llama_cpp.llama_cpp
    default = raw.llama_model_default_params

    def plain_params():
        params = default()
        params.use_extra_bufts = False
        return params

    raw.llama_model_default_params = plain_params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        raw.llama_model_default_params = default


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError(f"llama.cpp runtime: the llama-cpp-python package is not installed; fix: {INSTALL}") from None
    return llama_cpp


def _ftype(llama_cpp, gguf_type: str) -> int:
    name = f"LLAMA_FTYPE_MOSTLY_{gguf_type}" if gguf_type != "F32" else "LLAMA_FTYPE_ALL_F32"
    if not hasattr(llama_cpp, name):
        raise LowbitError(f"llama.cpp quantize: type '{gguf_type}' is not known to this llama-cpp-python")
    return int(getattr(llama_cpp, name))


def quantize(src: str | Path, dst: str | Path, gguf_type: str, imatrix: dict[str, np.ndarray] | None = None,
             nthread: int = 2, allow_requantize: bool = False) -> dict[str, str]:
    """llama.cpp's quantizer: src (F32/F16 GGUF) -> dst, written atomically. Returns tensor name -> type."""
    llama_cpp = _llama_cpp()
    dst = Path(dst)
    tmp = dst.resolve().parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = _ftype(llama_cpp, gguf_type)
    params.allow_requantize = allow_requantize
    keep = []  # the float buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-name terminated
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            if not np.isfinite(buf).all():
                raise LowbitError(f"importance matrix entry {name}: holds NaN/Inf; fix: calibrate again")
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    log = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log at this logger's level
    level = log.level
    log.setLevel(logging.ERROR)  # its per-tensor progress lines are noise here; errors still print
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise LowbitError(f"llama.cpp quantize: {src} -> {gguf_type} failed (code {rc}); see llama.cpp's error above")
        os.replace(tmp, dst)
    finally:
        log.setLevel(level)
        if tmp.exists():
            tmp.unlink()
    return tensor_types(dst)


def tensor_types(path: str | Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _cache() -> Path:
    from lowbit.model.sources import cache_root

    return cache_root() / "llamacpp"


def baseline_gguf(model: str = "smollm2-135m") -> Path:
    """An F32 GGUF of lowbit's FP32 baseline of `model`, written once into the cache."""
    from lowbit.exporters.gguf import write_gguf
    from lowbit.model.load import load_model

    from lowbit.exporters.gguf import SUPPORTED_ARCHS, source_gguf

    loaded = load_model(model)
    path = _cache() / f"{Path(str(model)).stem}-{loaded.source['sha256'][:12]}-F32.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = source_gguf(loaded.source)
        if type(loaded.module).__name__ not in SUPPORTED_ARCHS and src is not None:
            # an architecture lowbit's writer does not cover (Gemma 3): llama.cpp dequantizes the source
            # GGUF itself; lowbit's baseline is the same blocks dequantized, so it is the same model
            quantize(src, path, "F32", allow_requantize=True)
        else:
            write_gguf(loaded.module, path, "F32", loaded.source, loaded.folder)
    return path


def llama_quantized(model: str = "smollm2-135m", gguf_type: str = "Q4_K_M",
                    imatrix: dict[str, np.ndarray] | None = None) -> Path:
    """llama.cpp's own quantization of baseline_gguf(model) to gguf_type (cached when no imatrix is given)."""
    base = baseline_gguf(model)
    path = base.with_name(base.name.replace("-F32.gguf", f"-{gguf_type}.gguf"))
    if imatrix is not None or not path.is_file():
        if imatrix is not None:
            path = path.with_name(path.stem + "-imatrix.gguf")
        quantize(base, path, gguf_type, imatrix)
    return path


@torch.no_grad()
def importance_matrix(model, token_windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean x**2 per input channel of every linear layer over the given token windows (module name ->
    float32 [in_features]): the statistic llama.cpp's imatrix holds and lowbit artifacts store."""
    from torch import nn

    from lowbit.model.qlinear import QLinear

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, QLinear)):
            def hook(m, args, _name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[_name] = sums.get(_name, 0) + (x * x).sum(0)
                counts[_name] = counts.get(_name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for ids in token_windows:
            model(ids.reshape(1, -1))
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


class LlamaCppLM:
    """llama.cpp logits for token ids, callable like a transformers causal LM on a batch of one."""

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int = 2) -> None:
        _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"GGUF file {path}: does not exist")
        try:
            self.llm = open_llama(path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                                  n_ubatch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        except ValueError as e:
            raise LowbitError(f"GGUF file {path}: llama.cpp could not load it ({e})") from None
        self.n_ctx = n_ctx
        self.path = path

    def logits(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) float32 logits; each position predicts the next token."""
        if len(ids) > self.n_ctx:
            raise LowbitError(f"llama.cpp logits: {len(ids)} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError("LlamaCppLM takes a batch of one sequence, shape (1, seq)")
        return SimpleNamespace(logits=self.logits(input_ids[0].tolist())[None])

    def generate(self, ids: list[int], max_new_tokens: int = 16) -> list[int]:
        """Greedy continuation of ids."""
        self.llm.reset()
        out = []
        for tok in self.llm.generate([int(i) for i in ids], temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) == max_new_tokens or tok == self.llm.token_eos():
                break
        return out

    def close(self) -> None:
        self.llm.close()
