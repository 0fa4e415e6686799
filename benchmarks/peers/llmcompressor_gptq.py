"""GPTQ with llm-compressor (vLLM project) as a peer tool: a float Hugging Face folder in, a
compressed-tensors checkpoint out, calibrated on token ids given as JSON (no tokenization, no hub).

Run with the peer venv's python (benchmarks/peers/setup_llmcompressor.sh builds it); this file does
not import lowbit, so the peer's own dependency pins (transformers, compressed-tensors) apply.

    /work/peers/llmc-venv/bin/python benchmarks/peers/llmcompressor_gptq.py \\
        --model DIR --calib calib.json --scheme W4A16 --group-size 128 --out OUT_DIR

--calib: a JSON list of lists of token ids, one list per calibration sample (all used, in order).
The last stdout line is one JSON object: tool, version, seconds (oneshot: calibration, GPTQ and
save), peak_rss_mb (the process's max RSS), scheme, and the settings that produced the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def read_calib(path: Path) -> list[list[int]]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"calibration file {path}: cannot be read as JSON ({e})")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in rows):
        sys.exit(f"calibration file {path}: expected a non-empty JSON list of non-empty lists of token ids")
    return rows


def fit_group(columns: int, group_size: int, fallback: str, name: str) -> int:
    """The group size a layer of `columns` inputs gets: group_size when it divides columns, else (shrink)
    the largest power-of-two fraction of it that does and is >= 8 (lowbit's group_fallback: shrink)."""
    if columns % group_size == 0 or fallback == "error":
        return group_size  # "error": llm-compressor's own divisibility check reports the layer
    g = group_size
    while g > 1 and columns % g:
        g //= 2
    if columns % g or g < 8:
        sys.exit(f"module {name}: {columns} input columns, no group size <= {group_size} (>= 8) divides them; "
                 f"ignore it (--ignore {name}) or use --group-size 0 (per channel)")
    return g


def build_config(model, name: str, group_size: int | None, symmetric: bool | None, ignore: list[str], fallback: str):
    """(GPTQModifier kwargs, {group size or None: [modules]}, the weights' QuantizationArgs).

    A preset as llm-compressor names it when nothing changes it; otherwise custom QuantizationSchemes
    (the preset's with --group-size / --symmetric / --asymmetric applied), one per group size when
    --group-fallback shrink gives layers whose columns the group size does not divide a smaller one."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
    from compressed_tensors.utils import match_named_modules

    targets = ["Linear"]
    try:
        preset = preset_name_to_scheme(name, targets)
    except KeyError as e:
        sys.exit(f"--scheme {name}: {e}")
    w = preset.weights
    changes = {}
    if w is not None and group_size is not None:
        if group_size > 0:
            if not (w.strategy == "group" and w.group_size == group_size):
                changes.update(strategy="group", group_size=group_size)
        elif w.strategy == "group":  # 0: one scale per output channel
            changes.update(strategy="channel", group_size=None)
    if w is not None and symmetric is not None and w.symmetric != symmetric:
        changes["symmetric"] = symmetric
    args = None if w is None else {k: v for k, v in {**w.model_dump(), **changes}.items() if v is not None}
    g = None if args is None or args.get("strategy") != "group" else args["group_size"]
    layers: dict = {}
    for mod_name, mod in match_named_modules(model, targets, ignore):
        size = g if g is None else fit_group(mod.weight.shape[-1], g, fallback, mod_name)
        layers.setdefault(size, []).append(mod_name)
    if not layers:
        sys.exit(f"no Linear module left to quantize (ignore: {ignore})")
    if not changes and set(layers) <= {g}:
        return {"scheme": name.upper(), "targets": targets}, layers, w

    def scheme(size, mods):
        wa = None if args is None else QuantizationArgs(**({**args, "group_size": size} if size else args))
        return QuantizationScheme(targets=mods, weights=wa, input_activations=preset.input_activations,
                                  output_activations=preset.output_activations)

    if set(layers) <= {g}:
        groups = {"group_0": scheme(g, targets)}
    else:
        groups = {f"group_{i}": scheme(size, mods) for i, (size, mods) in enumerate(sorted(layers.items(), reverse=True))}
    return {"config_groups": groups}, layers, None if args is None else QuantizationArgs(**args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="float Hugging Face folder (config.json, safetensors, tokenizer)")
    ap.add_argument("--calib", required=True, type=Path, help="JSON list of lists of token ids, one per sample")
    ap.add_argument("--scheme", default="W4A16", help="llm-compressor preset scheme (W4A16, W4A16_ASYM, W8A8, W8A16, ...)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="weight group size; default: the preset's (128 for W4A16); 0 = per output channel")
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="symmetric weights (W4A16's own)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="asymmetric weights (integer zero point)")
    ap.add_argument("--group-fallback", default="shrink", choices=["shrink", "error"],
                    help="layers whose input columns the group size does not divide: shrink = the largest "
                         "power-of-two fraction of it that divides them (lowbit's group_fallback: shrink), "
                         "error = llm-compressor's own check refuses them")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening_frac: fraction of mean(diag H) added to H")
    ap.add_argument("--block-size", type=int, default=128, help="GPTQ block size (columns per pass)")
    ap.add_argument("--actorder", default="static", choices=["static", "weight", "none"],
                    help="GPTQ activation ordering: static (llm-compressor's default), weight, none")
    ap.add_argument("--ignore", action="append", default=None, help="module name/class not quantized; repeatable (default: lm_head)")
    ap.add_argument("--out", required=True, type=Path, help="where the compressed-tensors checkpoint is written")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    ignore = a.ignore if a.ignore is not None else ["lm_head"]

    if not (a.model / "config.json").is_file():
        sys.exit(f"--model {a.model}: no config.json")
    out = a.out.resolve()
    if out.exists() and not a.force:
        sys.exit(f"--out {out}: exists; pass --force to replace it")
    rows = read_calib(a.calib)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32, device_map=None)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(a.model))
    load_s = time.perf_counter() - t0

    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    kw, layers, w = build_config(model, a.scheme, a.group_size, a.symmetric, ignore, a.group_fallback)
    modifier = GPTQModifier(ignore=ignore, dampening_frac=a.damp, block_size=a.block_size,
                            actorder=None if a.actorder == "none" else a.actorder, **kw)

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        t1 = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=ds, recipe=modifier,
                num_calibration_samples=len(rows), shuffle_calibration_samples=False, batch_size=1,
                max_seq_length=max(len(r) for r in rows), output_dir=str(tmp), save_compressed=True)
        seconds = time.perf_counter() - t1
        if out.exists():  # --force
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "tool": "llm-compressor", "version": llmcompressor.__version__, "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1), "scheme": a.scheme.upper(),
        "weights": None if w is None else {"num_bits": w.num_bits, "type": str(getattr(w.type, "value", w.type)),
                                           "strategy": str(getattr(w.strategy, "value", w.strategy)),
                                           "group_size": w.group_size, "symmetric": w.symmetric},
        "layers_by_group_size": {str(k): len(v) for k, v in layers.items()}, "group_fallback": a.group_fallback,
        "damp": a.damp, "block_size": a.block_size, "actorder": a.actorder, "ignore": ignore,
        "samples": len(rows), "tokens": sum(len(r) for r in rows), "load_seconds": round(load_s, 2),
        "threads": torch.get_num_threads(), "out": str(out),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "compressed-tensors": compressed_tensors.__version__},
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
