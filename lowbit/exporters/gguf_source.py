"""The float model a quantized model came from, for GGUF exports that cannot use lowbit's codes.

A module whose scheme is not a GGUF block type bit for bit (int4 g128, an integer zero point, INT8
per channel, ...) must be quantized again for a quantized GGUF type, and every module is when
llama.cpp makes a K-quant mix from an F32 file. Done from lowbit's dequantized weights, that rounds
weights a second time; done from the float weights the model was quantized from, it does not. So
the writer asks float_source_for() whether those weights are still at hand:

  - which: the source identity the model carries (an in-memory model's `source`), or else the one
    the artifact folder's lowbit.json recorded (kind, path or bundled name, sha256 of its weights);
  - usable: a float kind (Hugging Face folder, GGUF file, bundled name) that still resolves to the
    same kind and whose weights hash to the recorded sha256 (lowbit.model.sources, remembered per
    size and mtime). A record without a sha256 is not followed: nothing outside the artifact is read
    unless its bytes can be checked against the artifact's own record;
  - per_module: whether the recorded quantization treated every module on its own (rtn, rtn-mse,
    gptq). Only then may one module's float weight stand beside another module's exact blocks:
    AWQ and SmoothQuant move scales between modules (and into the norms), so their artifacts are
    either taken from the float model as a whole or not at all.

The FloatSource says why not when it cannot be used, so the export notes can say what was done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

FLOAT_KINDS = ("hf", "gguf", "bundled")  # sources whose weights are the float model (compressed-tensors is not)
PER_MODULE_ALGORITHMS = ("rtn", "rtn-mse", "gptq")  # each module quantized on its own: nothing folded elsewhere
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FloatSource:
    """A quantized model's float source: `arg` (what lowbit.model.load.load_model takes) when usable,
    else None and `why_not`; `where` names it for the notes."""
    arg: str | None
    where: str = ""
    why_not: str = ""
    sha256: str = ""
    per_module: bool = False
    algorithm: str | None = None  # the recipe's algorithm, when an artifact recorded it

    @property
    def usable(self) -> bool:
        return self.arg is not None

    def refused(self, why: str) -> "FloatSource":
        return FloatSource(None, self.where, why, self.sha256, self.per_module, self.algorithm)


def recorded_source(source: dict | None, folder: Path | None) -> tuple[dict | None, dict | None]:
    """(source identity, lowbit.json or None): the given identity, else the artifact folder's record."""
    from lowbit.model.artifact import read_meta
    from lowbit.model.sources import ARTIFACT_FILE

    meta = None
    if folder is not None and (Path(folder) / ARTIFACT_FILE).is_file():
        try:
            meta = read_meta(Path(folder))
        except LowbitError:
            meta = None  # a damaged record names nothing to trust
    if not source and meta is not None:
        source = meta.get("source")
    return (source if isinstance(source, dict) and source else None), meta


def _first_line(e: Exception) -> str:
    return str(e).split("; fix:")[0].strip()


def float_source_for(source: dict | None, folder: Path | None = None) -> FloatSource:
    """Whether the float weights a quantized model came from can be read again, unchanged (see the
    module docstring). Reads (hashes) the source's weight files only when a sha256 is recorded."""
    from lowbit.model import sources
    from lowbit.model.load import float_folder

    source, meta = recorded_source(source, folder)
    algorithm = None
    if meta is not None:
        algorithm = (meta.get("recipe") or {}).get("algorithm")
        algorithm = algorithm if isinstance(algorithm, str) else None
    per_module = algorithm in PER_MODULE_ALGORITHMS
    if source is None:
        return FloatSource(None, "", "no float source is recorded", "", per_module, algorithm)
    kind = source.get("kind")
    where = source.get("name") if kind == "bundled" else source.get("path")
    where = where if isinstance(where, str) else ""
    fs = FloatSource(None, where, "", "", per_module, algorithm)
    if kind not in FLOAT_KINDS:
        return fs.refused(f"its source {where or '(unnamed)'} is a {kind} checkpoint, not float weights")
    if not where:
        return fs.refused("the record names no path for it")
    digest = source.get("sha256")
    if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        return fs.refused(f"no sha256 of {where} is recorded to check it against")
    fs = FloatSource(None, where, "", digest, per_module, algorithm)
    try:
        if kind == "bundled":
            if where not in sources.BUNDLED:
                return fs.refused(f"'{where}' is not a bundled model name")
            src = sources.resolve(where)
            got = sources.sha256_memo([sources.gguf_path(src)])  # raises when the package is not installed
        else:
            path = Path(where).expanduser()
            if not path.exists():
                return fs.refused(f"not found at {where}")
            if not (path.is_file() or path.is_dir()):  # a pipe or device named like a model is never read
                return fs.refused(f"{where} is not a regular file or folder")
            src = sources.resolve(where)
            if src.kind != kind:
                return fs.refused(f"{where} is now a {src.kind} model, not the {kind} model it was")
            got = sources.sha256_memo([src.path]) if kind == "gguf" else float_folder(src)[1]
    except LowbitError as e:
        return fs.refused(f"{where} cannot be read as it was ({_first_line(e)})")
    except OSError as e:
        return fs.refused(f"{where} cannot be read ({e.strerror or e})")
    if got != digest:
        return fs.refused(f"{where} has changed since it was quantized (sha256 {got[:12]}..., recorded {digest[:12]}...)")
    return FloatSource(where, where, "", digest, per_module, algorithm)


def load_float_source(fs: FloatSource):
    """The float model of a usable FloatSource (a lowbit.Model, float32), checked against the record again."""
    from lowbit.model.load import load_model

    loaded = load_model(fs.arg)
    if loaded.source.get("sha256") != fs.sha256:
        raise LowbitError(f"float source {fs.where}: changed while the export read it (sha256 "
                          f"{str(loaded.source.get('sha256'))[:12]}..., recorded {fs.sha256[:12]}...)")
    return loaded
