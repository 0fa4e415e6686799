"""Off-grid variants of the bundled models: their quantized weights dithered within their own bins.

    .venv/bin/python benchmarks/offgrid.py [--model smollm2-135m|gemma3-270m|all] [--seed 0] [--out DIR] [--check]

Both bundled models were shipped quantized (SmolLM2-135M as Q4_1 g32, Gemma-3-270M as Q4_K_M: mostly
Q5_0, with Q8_0, Q4_K and Q6_K tensors), so their weights sit on a 4- or 5-bit grid, and a format that
happens to share that grid reproduces them almost exactly and looks better than it would on a real
full-precision checkpoint. This script writes an F32 GGUF of each bundled GGUF in which every weight of
a quantized tensor is moved by uniform noise of up to half a grid step: it stays inside the bin it was
rounded into (so the model is, to the quantizer that made it, the same model), but no longer sits on
any grid. Norms and other float tensors are copied unchanged, and every metadata key/value (tokenizer,
hyperparameters, chat template) is copied unchanged except general.file_type, which becomes 0 (ALL_F32).

The grid step of each block is read from the block's stored scale, not guessed from its values: the
smallest gap between a block's distinct values is a multiple of the step whenever neighbouring codes
are missing, which is common for Q8_0 (32 weights on 255 levels), and noise of half that gap would move
weights into other bins (the verification counts how often that estimate would have been wrong). K-quants
keep one scale per sub-block, so their step is read per sub-block: 16 weights for Q2_K, Q3_K and Q6_K,
32 for Q4_K and Q5_K. A sub-block whose scale is zero is left unchanged.

The noise is seeded (--seed) and drawn per tensor from the seed and a hash of the tensor's name, so the
same seed gives the same bytes. Other benchmarks use the variants through

    sys.path.insert(0, "benchmarks"); from offgrid import offgrid_path
    path = offgrid_path("smollm2-135m")   # builds ~/.cache/lowbit/offgrid/<stem>-offgrid-s0.gguf once

The command builds each variant when missing (--rebuild builds it again), reads it back against its
source (names, order, shapes, metadata, offsets in steps, share of weights still on a grid value),
re-quantizes one dithered tensor with its source type, loads the variant with lowbit and compares its
next-token distributions with the bundled model's on Wikipedia text, then writes the "offgrid" section
of docs/BENCHMARKS.md. --check verifies existing variants only: it builds and writes nothing. Either
way the exit code is 1 when a check fails, 2 on bad input (a missing bundle, a damaged file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.model import sources  # noqa: E402

Q = GGMLQuantizationType
ALL_F32 = 0  # general.file_type of a file whose tensors are all F32 (llama.cpp's LLAMA_FTYPE_ALL_F32)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)  # copied as F32, values unchanged
# A hair inside half a step: float32 rounding of (weight + noise) can then never land on a bin edge,
# where round-half-to-even would move the weight into the neighbouring bin.
HALF = 0.5 * (1 - 1e-4)
CHUNK = 1 << 22  # weights dequantized at a time: the noise is float64, so this bounds temporaries to tens of MB
# Nats per token. Noise of up to half a step is as large as a fresh 4-bit rounding error, so on SmolLM2 the
# variant is ~0.35 nats from the bundled model (as far as w4-g32 RTN is); a variant loaded wrongly (transposed
# shapes, lost norms, another tokenizer) is off by whole nats.
MAX_KLD = 1.0


# -- grid steps, read from the stored block scales ------------------------------------------------------
def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """(n_blocks, 1) float32 from the fp16 stored at byte `at` of each block."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _step_legacy(blocks):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: one scale d in the block's first two bytes; the grid is d * code (+ m)."""
    return np.abs(_f16(blocks, 0))


def _step_q2_k(blocks):
    """Q2_K: 16 bytes of (min << 4 | scale) per 16-weight sub-block, then 64 bytes of codes, then d, dmin."""
    return _f16(blocks, 80) * (blocks[:, :16] & 0x0F).astype(np.float32)


def _step_q3_k(blocks):
    """Q3_K: 6-bit signed scales (offset 32) per 16-weight sub-block, packed as 16 low nibbles in 8 bytes
    and 16 two-bit high parts in 4 bytes, after a 32-byte high-bit mask and 64 bytes of codes; d last."""
    low, high = blocks[:, 96:104], blocks[:, 104:108]
    lo4 = np.concatenate([low & 0x0F, low >> 4], axis=1)
    hi2 = np.concatenate([(high >> s) & 0x03 for s in (0, 2, 4, 6)], axis=1)
    scale = (lo4 | (hi2 << 4)).astype(np.float32) - 32
    return np.abs(_f16(blocks, 108) * scale)


def _step_q45_k(blocks):
    """Q4_K/Q5_K: d, dmin, then 12 bytes packing eight 6-bit scales and mins, one per 32-weight sub-block."""
    scale, _ = quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return _f16(blocks, 0) * scale.astype(np.float32)


def _step_q6_k(blocks):
    """Q6_K: 128 + 64 bytes of codes, sixteen int8 scales (one per 16 weights), then d."""
    scale = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    return np.abs(_f16(blocks, 208) * scale)


STEP_READERS = {Q.Q4_0: _step_legacy, Q.Q4_1: _step_legacy, Q.Q5_0: _step_legacy, Q.Q5_1: _step_legacy,
                Q.Q8_0: _step_legacy, Q.Q2_K: _step_q2_k, Q.Q3_K: _step_q3_k, Q.Q4_K: _step_q45_k,
                Q.Q5_K: _step_q45_k, Q.Q6_K: _step_q6_k}
REQUANT_TYPES = (Q.Q4_1, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # types gguf-py can quantize as well as read


def grid_steps(raw: np.ndarray, qtype: Q) -> tuple[np.ndarray, int]:
    """(step of every sub-block in storage order, sub-block length) for quantized rows of raw bytes."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    steps = STEP_READERS[qtype](raw.reshape(-1, type_size))
    return steps.reshape(-1), GGML_QUANT_SIZES[qtype][0] // steps.shape[1]


# -- offsets and the statistics kept about them -----------------------------------------------------------
def _empty_stats() -> dict:
    return {"weights": 0, "max_offset_steps": 0.0, "on_grid": 0, "zero_step_weights": 0,
            "subblocks_multi": 0, "gap_over_step": 0}


def offset_stats(orig: np.ndarray, new: np.ndarray, steps: np.ndarray) -> dict:
    """How far each weight moved, in steps of its sub-block (orig, new: (n_subblocks, sub_len)), and how
    often the smallest gap between a sub-block's distinct values is more than one step (the value-based
    step estimate this script does not use)."""
    s = steps.astype(np.float64)[:, None]
    live = np.broadcast_to(s > 0, orig.shape)
    ratio = np.abs(new.astype(np.float64) - orig) / np.where(s > 0, s, 1.0)
    gaps = np.diff(np.sort(orig, axis=1), axis=1)
    gaps = np.where(gaps > 0, gaps, np.inf).min(axis=1)
    multi = np.isfinite(gaps) & (steps > 0)
    return {"weights": int(live.sum()), "max_offset_steps": float(ratio[live].max(initial=0.0)),
            "on_grid": int((live & (new == orig)).sum()), "zero_step_weights": int((~live).sum()),
            "subblocks_multi": int(multi.sum()), "gap_over_step": int((multi & (gaps > 1.5 * steps)).sum())}


def _merge(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = max(total[k], v) if k == "max_offset_steps" else total[k] + v


def _totals(per_type: dict[str, dict]) -> dict:
    """Per-type statistics summed over types, with the per-type table kept."""
    total = _empty_stats()
    for st in per_type.values():
        _merge(total, {k: st[k] for k in total})
    return {"dithered": sum(st["tensors"] for st in per_type.values()), **total, "per_type": per_type}


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The noise of one tensor depends only on the seed and its name, not on order or chunking."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])


def _np_shape(t) -> tuple[int, ...]:
    """GGUF lists dimensions innermost first; numpy (and GGUFWriter, which reverses them) outermost first."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _row_chunks(t):
    """Quantized bytes of tensor t as (rows, bytes per row) pieces of about CHUNK weights each."""
    raw = t.data.reshape(-1, t.data.shape[-1])
    per_row = int(t.shape[0])
    step = max(1, CHUNK // per_row)
    for r in range(0, raw.shape[0], step):
        yield r * per_row, raw[r:r + step]


def dither_tensor(t, seed: int) -> tuple[np.ndarray, dict]:
    """The F32 weights of one quantized tensor, each moved by U[-step/2, step/2) of its sub-block."""
    rng = _tensor_rng(seed, t.name)
    out = np.empty(int(t.n_elements), dtype=np.float32)
    stats = _empty_stats()
    for start, raw in _row_chunks(t):
        vals = quants.dequantize(raw, t.tensor_type)
        steps, sub = grid_steps(raw, t.tensor_type)
        orig = vals.reshape(-1, sub)
        noise = (2 * rng.random(orig.shape) - 1) * HALF * steps.astype(np.float64)[:, None]
        new = (orig + noise).astype(np.float32)
        _merge(stats, offset_stats(orig, new, steps))
        out[start:start + new.size] = new.reshape(-1)
    return out.reshape(_np_shape(t)), stats


def float_tensor(t) -> np.ndarray:
    """An F32/F16/BF16 tensor's values as float32, in numpy order."""
    return quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(_np_shape(t))


# -- the file ------------------------------------------------------------------------------------------
def _read(path: Path) -> GGUFReader:
    sources.check_gguf(path)  # a truncated or foreign file gets an error naming it
    return GGUFReader(str(path))


def _check_types(reader: GGUFReader, path: Path) -> None:
    for t in reader.tensors:
        if t.tensor_type not in FLOAT_TYPES and t.tensor_type not in STEP_READERS:
            raise LowbitError(
                f"GGUF file {path}: tensor {t.name} is {t.tensor_type.name}, whose grid step offgrid.py cannot read; "
                f"fix: add a step reader for it to STEP_READERS in benchmarks/offgrid.py")


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, path: Path) -> None:
    """Every key/value in source order; general.file_type becomes ALL_F32. The GGUF.* fields are the
    reader's view of the header (version, counts), which the writer produces itself."""
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer adds the architecture first
            continue
        if len(f.types) > 2 or (f.types[0] == GGUFValueType.ARRAY and not len(f.data)):
            raise LowbitError(f"GGUF file {path}: key {key} is a nested or empty array, which gguf-py's writer "
                              f"cannot write; fix: drop the key from the source file")
        if key == "general.file_type":
            writer.add_key_value(key, ALL_F32, f.types[0])
            continue
        if key == "general.alignment":
            writer.data_alignment = int(f.contents())
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub)
    if "general.file_type" not in reader.fields:
        writer.add_key_value("general.file_type", ALL_F32, GGUFValueType.UINT32)


def _architecture(reader: GGUFReader, path: Path) -> str:
    f = reader.fields.get("general.architecture")
    if f is None:
        raise LowbitError(f"GGUF file {path}: has no general.architecture key; fix: use a GGUF written by llama.cpp's "
                          f"converter or lowbit export")
    return str(f.contents())


def _write(reader: GGUFReader, src: Path, tmp: Path, seed: int) -> dict:
    writer = GGUFWriter(str(tmp), _architecture(reader, src))
    _copy_metadata(reader, writer, src)
    for t in reader.tensors:  # the header lists every tensor first; data follows one tensor at a time
        writer.add_tensor_info(t.name, _np_shape(t), np.dtype(np.float32), 4 * int(t.n_elements))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    per_type: dict[str, dict] = {}
    copied = 0
    for t in reader.tensors:
        if t.tensor_type in FLOAT_TYPES:
            writer.write_tensor_data(np.ascontiguousarray(float_tensor(t)))
            copied += 1
            continue
        data, st = dither_tensor(t, seed)
        _merge(per_type.setdefault(t.tensor_type.name, _empty_stats() | {"tensors": 0}), st | {"tensors": 1})
        writer.write_tensor_data(data)
    writer.close()
    return {"copied": copied, "per_type": per_type}


def dither_gguf(src: Path, dst: Path, seed: int) -> dict:
    """Write the off-grid F32 variant of GGUF `src` to `dst` (a temporary beside it, renamed into place)
    and return what was done: tensors dithered and copied, offsets in steps, per source type."""
    src, dst = Path(src), Path(dst)
    if seed < 0:
        raise LowbitError(f"offgrid: --seed {seed} is negative; fix: pass a seed >= 0")
    t0 = time.perf_counter()
    reader = _read(src)
    _check_types(reader, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        stats = _write(reader, src, tmp, seed)
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name says the file is complete
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"src": str(src), "dst": str(dst), "seed": seed, "copied": stats["copied"], **_totals(stats["per_type"]),
            "seconds": time.perf_counter() - t0}


def default_dir() -> Path:
    return sources.cache_root() / "offgrid"


def source_gguf(model_name: str) -> Path:
    """The bundled GGUF of a bundled model name (a LowbitError with the pip command when not installed)."""
    if model_name not in sources.BUNDLED:
        raise LowbitError(f"offgrid: model '{model_name}' is not a bundled model; fix: use one of "
                          f"{', '.join(sources.BUNDLED)}")
    return sources.gguf_path(sources.resolve(model_name))


def variant_path(model_name: str, seed: int = 0, out_dir: Path | None = None) -> Path:
    return Path(out_dir or default_dir()) / f"{source_gguf(model_name).stem}-offgrid-s{seed}.gguf"


def offgrid_path(model_name: str, seed: int = 0, out_dir: Path | None = None) -> Path:
    """The off-grid variant of a bundled model, built on first use (the rename makes a present file complete)."""
    dst = variant_path(model_name, seed, out_dir)
    if not dst.is_file():
        dither_gguf(source_gguf(model_name), dst, seed)
    return dst


# -- verification -------------------------------------------------------------------------------------
def _same_metadata(a: GGUFReader, b: GGUFReader, dst: Path) -> None:
    keys_a = [k for k in a.fields if not k.startswith("GGUF.")]
    keys_b = [k for k in b.fields if not k.startswith("GGUF.")]
    if set(keys_a) | {"general.file_type"} != set(keys_b):
        raise LowbitError(f"GGUF file {dst}: its keys differ from the source's ({sorted(set(keys_a) ^ set(keys_b))}); "
                          f"fix: rebuild it with --rebuild")
    for k in keys_a:
        fa, fb = a.fields[k], b.fields[k]
        if fa.types != fb.types or (k != "general.file_type" and fa.contents() != fb.contents()):
            raise LowbitError(f"GGUF file {dst}: key {k} differs from the source's; fix: rebuild it with --rebuild")
    if b.fields["general.file_type"].contents() != ALL_F32:
        raise LowbitError(f"GGUF file {dst}: general.file_type is not 0 (ALL_F32); fix: rebuild it with --rebuild")


def _same_tensor_list(a: GGUFReader, b: GGUFReader, dst: Path) -> None:
    names = [t.name for t in a.tensors]
    if names != [t.name for t in b.tensors]:
        raise LowbitError(f"GGUF file {dst}: tensor names or order differ from the source's; fix: rebuild it with --rebuild")
    for ta, tb in zip(a.tensors, b.tensors):
        if ta.shape.tolist() != tb.shape.tolist() or tb.tensor_type != Q.F32:
            raise LowbitError(f"GGUF file {dst}: tensor {ta.name} is {tb.tensor_type.name} {tb.shape.tolist()}, "
                              f"expected F32 {ta.shape.tolist()}; fix: rebuild it with --rebuild")


def _tensor_offsets(ta, tb) -> dict:
    """offset_stats of one dithered tensor read back from the file, against its source."""
    new_all = tb.data.reshape(-1)
    stats = _empty_stats()
    for start, raw in _row_chunks(ta):
        orig = quants.dequantize(raw, ta.tensor_type)
        steps, sub = grid_steps(raw, ta.tensor_type)
        new = np.asarray(new_all[start:start + orig.size]).reshape(-1, sub)
        _merge(stats, offset_stats(orig.reshape(-1, sub), new, steps))
    return stats


def open_pair(src: Path, dst: Path) -> tuple[GGUFReader, GGUFReader]:
    """Both files, opened once: parsing a 262k-token vocabulary takes GGUFReader seconds."""
    return _read(Path(src)), _read(Path(dst))


def verify_variant(src: Path, dst: Path, readers: tuple[GGUFReader, GGUFReader] | None = None) -> dict:
    """Read `dst` back against `src`: same keys and values (file type aside), same tensor names, order and
    shapes, all F32; float tensors identical; dithered ones measured in steps of their source sub-blocks."""
    a, b = readers or open_pair(src, dst)
    _same_metadata(a, b, Path(dst))
    _same_tensor_list(a, b, Path(dst))
    per_type: dict[str, dict] = {}
    copied = 0
    for ta, tb in zip(a.tensors, b.tensors):
        if ta.tensor_type in FLOAT_TYPES:
            if not np.array_equal(float_tensor(ta), tb.data.reshape(_np_shape(ta))):
                raise LowbitError(f"GGUF file {dst}: float tensor {ta.name} differs from the source's; "
                                  f"fix: rebuild it with --rebuild")
            copied += 1
            continue
        _merge(per_type.setdefault(ta.tensor_type.name, _empty_stats() | {"tensors": 0}),
               _tensor_offsets(ta, tb) | {"tensors": 1})
    return {"copied": copied, **_totals(per_type)}


def file_problems(st: dict) -> list[str]:
    """What a correct variant must show: every weight within half a step, essentially none on a grid value."""
    out = []
    if st["max_offset_steps"] > 0.5:
        out.append(f"a weight moved {st['max_offset_steps']:.4f} steps (> 0.5: out of its bin)")
    if st["weights"] and st["on_grid"] / st["weights"] > 1e-4:
        out.append(f"{st['on_grid'] / st['weights']:.2%} of dithered weights still equal their grid value")
    if not st["dithered"]:
        out.append("no tensor was dithered")
    return out


def requant_check(src: Path, dst: Path, readers: tuple[GGUFReader, GGUFReader] | None = None) -> dict:
    """Quantize one dithered tensor again with its source type (gguf-py's reference quantizer): the original
    weights come back (nearly) exactly, the dithered ones do not. Relative error = |w' - w| / |w|."""
    a, b = readers or open_pair(src, dst)
    found = [i for i, t in enumerate(a.tensors) if t.tensor_type in REQUANT_TYPES and len(t.shape) == 2]
    if not found:
        return {}
    common = max(REQUANT_TYPES, key=lambda q: sum(a.tensors[i].tensor_type == q for i in found))
    # a layer's weight rather than the embedding, which is often stored in a finer type than the layers
    i = min((i for i in found if a.tensors[i].tensor_type == common), key=lambda i: a.tensors[i].name.startswith("token_embd"))
    ta, tb = a.tensors[i], b.tensors[i]
    orig = quants.dequantize(ta.data, common)
    new = np.asarray(tb.data).reshape(orig.shape)

    def rel(w):
        back = quants.dequantize(quants.quantize(w, common), common)
        return float(np.linalg.norm(back - w) / np.linalg.norm(w))

    return {"tensor": ta.name, "type": common.name, "original": rel(orig), "dithered": rel(new)}


def logit_check(model_name: str, path: Path, tokens: int, seq_len: int) -> dict:
    """Load the bundled model and the variant with lowbit; KL(original || variant) and top-1 agreement per
    predicted token on the first `tokens` tokens of the Wikipedia text, and whether the tokenizers agree."""
    import torch

    import lowbit
    from lowbit.data.corpora import wikipedia_text
    from lowbit.eval.perplexity import token_windows

    from benchmarks.presets import compare

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base, var = lowbit.load(model_name), lowbit.load(str(path))
    text = wikipedia_text()
    windows = token_windows(base.tokenizer, text, tokens, seq_len)
    same_tok = base.tokenizer(text[:20_000]).input_ids == var.tokenizer(text[:20_000]).input_ids
    m = compare(base.module, var.module, windows)
    return {**m, "same_tokenizer": same_tok, "windows": int(windows.shape[0]), "seq_len": seq_len}


def model_problems(m: dict) -> list[str]:
    out = []
    if not m["same_tokenizer"]:
        out.append("the variant's tokenizer splits the text differently from the bundled model's")
    if not 0 < m["kld"] < MAX_KLD:
        out.append(f"mean KLD {m['kld']:.4g} is not in (0, {MAX_KLD}): the variant is not a slightly moved copy")
    return out


# -- the command -------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_model(name: str, args) -> dict:
    src = source_gguf(name)
    dst = variant_path(name, args.seed, args.out)
    built = None
    if args.check and not dst.is_file():
        raise LowbitError(f"offgrid --check: {dst} does not exist; fix: build it by running without --check")
    if not args.check and (args.rebuild or not dst.is_file()):
        print(f"{name}: writing {dst}", flush=True)
        built = dither_gguf(src, dst, args.seed)
        print(f"  built in {built['seconds']:.1f} s", flush=True)
    t0 = time.perf_counter()
    readers = open_pair(src, dst)
    st = verify_variant(src, dst, readers)
    req = requant_check(src, dst, readers)
    del readers  # their memory maps
    print(f"  read back in {time.perf_counter() - t0:.1f} s", flush=True)
    m = logit_check(name, dst, args.tokens, args.seq_len)
    r = {"name": name, "src": src, "dst": dst, "built": built, "file": st, "requant": req, "logits": m,
         "problems": file_problems(st) + model_problems(m)}
    print_result(r)
    return r


def print_result(r: dict) -> None:
    st, m, req = r["file"], r["logits"], r["requant"]
    print(f"  tensors dithered {st['dithered']}, copied {st['copied']}; weights dithered {st['weights']:,}")
    print(f"  max |offgrid - original| / step {st['max_offset_steps']:.6f}; on a grid value "
          f"{st['on_grid'] / max(st['weights'], 1):.2e}; in zero-step sub-blocks {st['zero_step_weights']:,}")
    for t, s in sorted(r["file"]["per_type"].items()):
        print(f"    {t}: {s['tensors']} tensors, smallest value gap > 1 step in "
              f"{s['gap_over_step'] / max(s['subblocks_multi'], 1):.2%} of sub-blocks")
    if req:
        print(f"  requantized {req['tensor']} as {req['type']}: relative error original {req['original']:.2e}, "
              f"offgrid {req['dithered']:.2e}")
    print(f"  vs bundled: mean KLD {m['kld']:.5f}, top-1 {m['top1']:.4f} over {m['tokens']} tokens; "
          f"ppl {m['ppl_base']:.3f} -> {m['ppl']:.3f}; same tokenizer {m['same_tokenizer']}")
    for p in r["problems"]:
        print(f"  FAIL: {p}")


def _row(r: dict) -> str:
    st, m, req, b = r["file"], r["logits"], r["requant"], r["built"]
    types = ", ".join(f"{t} {s['tensors']}" for t, s in sorted(st["per_type"].items()))
    gaps = ", ".join(f"{t} {s['gap_over_step'] / max(s['subblocks_multi'], 1):.1%}" for t, s in sorted(st["per_type"].items()))
    rq = f"{req['type']} `{req['tensor']}`: {req['original']:.1e} -> {req['dithered']:.3f}" if req else "-"
    built = f"{b['seconds']:.0f} s" if b else "reused"
    return (f"| {r['name']} | `{r['dst'].name}` ({r['dst'].stat().st_size / 1e6:.0f} MB) | {st['dithered']} ({types}) / "
            f"{st['copied']} | {st['max_offset_steps']:.5f} | {st['on_grid'] / max(st['weights'], 1):.1e} | "
            f"{st['zero_step_weights']:,} | {gaps} | {rq} | {m['kld']:.4f} | {m['top1']:.3f} | "
            f"{m['ppl_base']:.2f} -> {m['ppl']:.2f} | {built} |")


def section(results: list[dict], skipped: list[str], args, seconds: float) -> str:
    from importlib.metadata import version

    import torch

    import lowbit

    m0 = results[0]["logits"]
    lines = [
        "## Off-grid variants of the bundled models",
        "",
        f"Written by `benchmarks/offgrid.py --model {args.model} --seed {args.seed}` on {time.strftime('%Y-%m-%d')} "
        f"(CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"gguf-py {version('gguf')}, lowbit {lowbit.__version__}); {seconds:.0f} s in all.",
        "",
        "Both bundled models were shipped quantized, so their weights sit on a 4- or 5-bit grid that formats sharing it "
        "reproduce almost exactly. Each variant is an F32 GGUF in which every weight of a quantized tensor moved by "
        "uniform noise within its own bin (up to half the grid step of its block, read from the block's stored scale; "
        "per 16- or 32-weight sub-block for K-quants); float tensors and all metadata are copied (file type: ALL_F32). "
        "Columns: the tensors dithered (by source type) and copied; the largest move in steps (at most 0.5); the "
        "share of dithered weights still equal to their grid value; weights left unchanged because their sub-block's "
        "scale is zero; how often the smallest gap between a sub-block's distinct values exceeds one step (the "
        "value-based step estimate would have been that wrong there); one tensor re-quantized with its source type "
        "by gguf-py (relative error of the original -> of the variant); then the variant loaded with `lowbit.load` "
        f"against the bundled model on the first {m0['windows'] * m0['seq_len']} tokens of the gensim Wikipedia text "
        f"({m0['windows']} windows of {m0['seq_len']}): mean KL(bundled || variant) per predicted token, top-1 "
        f"agreement, perplexity.",
        "",
        "The variants are not close copies: noise of up to half a step is as large as a fresh 4-bit rounding error, "
        "so a variant is about as far from its bundled model as a new 4-bit quantization would be. Compare formats "
        "against the variant itself as the full-precision baseline, not against the bundled model. A weight within "
        "half a step of its grid value can only be on the grid by equalling that value, so the on-grid share counts "
        "exactly those (float32 rounding of a tiny draw).",
        "",
        "| model | file | tensors dithered / copied | max move (steps) | on grid | zero-step weights | "
        "smallest gap > 1 step | requantized: rel. error | mean KLD | top-1 | perplexity | build |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in results]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    lines += ["", "Other benchmarks use them through `from offgrid import offgrid_path` (benchmarks/ on sys.path); "
                  "the files live in `~/.cache/lowbit/offgrid/` and the same seed gives the same bytes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=[*sources.BUNDLED, "all"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for the variants (default ~/.cache/lowbit/offgrid)")
    ap.add_argument("--check", action="store_true", help="verify existing variants only; build and write nothing")
    ap.add_argument("--rebuild", action="store_true", help="build the variants even when present")
    ap.add_argument("--tokens", type=int, default=1024, help="Wikipedia tokens for the logit comparison")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names = list(sources.BUNDLED) if args.model == "all" else [args.model]
    results, skipped = [], []
    try:
        for name in names:
            try:
                source_gguf(name)
            except LowbitError as e:
                if args.model != "all":
                    raise
                print(f"{name}: skipped ({e})")
                skipped.append(f"{name} (its bundle is not installed: {sources.BUNDLED[name].pip})")
                continue
            results.append(run_model(name, args))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(f"total {seconds:.0f} s")
    if not args.check and results:
        from benchmarks.presets import write_section

        write_section(args.doc, "offgrid", section(results, skipped, args, seconds))
        print(f"wrote {args.doc}")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
