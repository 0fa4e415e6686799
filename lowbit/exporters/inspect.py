"""What an artifact holds, read from lowbit.json and the safetensors header alone (no model build)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.model.artifact import WEIGHTS_FILE, check_files, check_tensors, read_meta
from lowbit.model.quantize import plans_from_json
from lowbit.model.st_reader import read_header
from lowbit.model.sources import ARTIFACT_FILE, ST_ITEM_BYTES, check_safetensors

_BYTES = ST_ITEM_BYTES


def _header(path: Path) -> dict:
    check_safetensors(path)
    return read_header(path)[1]


def compute_path(spec: dict | None, in_features: int = 0, has_perm: bool = False, out_features: int = 16) -> str:
    """Which CPU kernel a module runs (lowbit.model.kernels): int8pack, int4pack, int8dyn, or
    bf16deq (no fast kernel: dequantize then matmul) with the reason; "float" for a kept module.
    "+ native": lowbit's own kernels serve this module's decode-size products on this machine."""
    if spec is None:
        return "float"
    from lowbit import native
    from lowbit.formats.spec import QuantSpec
    from lowbit.model.kernels import plan_for

    plan = plan_for(QuantSpec.from_dict(spec), in_features, has_perm, out_features)
    if not plan.fast:
        return f"{plan.name} (slow: {plan.reason})"
    fits = (plan.name == "int8pack" and native.int8_supported(in_features)) or \
        (plan.name == "int4pack" and native.int4_supported(in_features, out_features, plan.group))
    return plan.name + (" + native" if fits and native.available() else "")


def artifact_summary(folder: str | Path) -> dict:
    folder = Path(folder)
    meta_path = folder / ARTIFACT_FILE
    if not meta_path.is_file():
        raise LowbitError(f"artifact {folder}: {ARTIFACT_FILE} not found; fix: pass a folder written by `lowbit quantize`")
    meta = read_meta(folder)  # the same checks a load makes, short of building the model
    modules = meta["modules"]
    header = _header(folder / WEIGHTS_FILE)
    check_files(folder, meta)
    check_tensors(folder / WEIGHTS_FILE, plans_from_json(modules), header)
    sizes = {k: _BYTES.get(v["dtype"], 4) * _numel(v["shape"]) for k, v in header.items()}
    rows, q_bytes, q_params = [], 0, 0
    claimed = set()
    for name, m in modules.items():
        params = m["in_features"] * m["out_features"]
        keys = [k for k in header if k.rpartition(".")[0] == name]
        claimed.update(keys)
        nbytes = sum(sizes[k] for k in keys)
        if m["spec"] is not None:
            q_bytes += sum(sizes[k] for k in keys if not k.endswith(".bias"))
            q_params += params
        spec = m["spec"]
        fmt = "kept (" + meta["recipe"].get("keep_dtype", "?") + ")" if spec is None else _label(spec)
        rows.append({"name": name, "format": fmt, "in_features": m["in_features"], "out_features": m["out_features"],
                     "bytes": nbytes, "bits_per_weight": 8 * nbytes / params if nbytes else 0.0,
                     "path": compute_path(spec, m["in_features"], any(k.endswith(".perm") for k in keys), m["out_features"]), "note": m.get("note", "") or ("tied to the embeddings" if not keys else "")})
    total_bytes = sum(sizes.values())
    # parameters: quantized linears count as in*out; everything else by its stored numel
    other = sum(_numel(v["shape"]) for k, v in header.items() if k not in claimed)
    stored = {k.rpartition(".")[0] for k in claimed}  # a tied head stores nothing of its own
    params = other + sum(m["in_features"] * m["out_features"] for n, m in modules.items() if n in stored)
    return {
        "artifact": str(folder),
        "lowbit_version": meta.get("lowbit_version"),
        "recipe": meta.get("recipe", {}),
        "source": meta.get("source", {}),
        "bytes_on_disk": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "weight_bytes": total_bytes,
        "parameters": params,
        "model_bits_per_weight": 8 * total_bytes / max(params, 1),
        "linear_bits_per_weight": 8 * q_bytes / max(q_params, 1),
        "modules": rows,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _label(spec: dict) -> str:
    from lowbit.formats.spec import QuantSpec

    return QuantSpec.from_dict(spec).label
