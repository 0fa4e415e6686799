"""The public Python API: one verb per step, each taking and returning lowbit.Model handles.

    model = lowbit.load("smollm2-135m")
    q = lowbit.quantize(model, "w4-g128", calib=lowbit.CalibConfig(method="gptq", samples=32))
    run = lowbit.evaluate(model, q, config=lowbit.EvalConfig(quick=True))
    lowbit.save(q, "out/smollm2-w4")
    lowbit.export(q, format="gguf", out="out/smollm2-w4.gguf")
    print(lowbit.generate(q, "What is the capital of France?").text)

The command line is a thin layer over these functions.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.benchmark.latency import BenchConfig, bench_pair
from lowbit.calib import CalibConfig, calibrate, calibrate_checkpoint, method_for
from lowbit.errors import LowbitError
from lowbit.eval.run import SUITES, EvalConfig, check_user_files, identity, load_pair
from lowbit.eval.run import evaluate as _evaluate
from lowbit.formats.spec import QuantSpec
from lowbit.model.artifact import out_target, output_lock, prepare_out_dir, prepare_out_file, save_artifact
from lowbit.model.handle import Model, as_model
from lowbit.model.load import load_model, load_streaming
from lowbit.model.quantize import quantize_model
from lowbit.recipe import PRESETS, Recipe, preset, resolve_recipe
from lowbit.version import __version__

Progress = Callable[[str, int, int], None]  # (what, done, total)
Say = Callable[[str], None]
EXPORT_FORMATS = ("gguf", "compressed-tensors")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _input_paths(model) -> list[Path]:
    """The files and folders a model argument reads: its path (a bundled name: the package files that
    ship it), a loaded handle's folder and its float source, and for a GGUF or bundled model the cache
    folders its converted copy lives in. Only compared with --out, never read."""
    from lowbit.model import sources

    paths: list[Path] = []
    kind = None
    if isinstance(model, (str, Path)):
        src = sources.resolve(model)  # a missing model fails here, before any work
        kind = src.kind
        if kind == "bundled":
            try:
                paths += sources.bundled_parts(sources.BUNDLED[src.name])
            except LowbitError:
                pass  # not installed: loading says so
        else:
            paths.append(src.path)
    elif isinstance(model, Model):
        kind = (model.source or {}).get("kind")
        if model.folder is not None:
            paths.append(Path(model.folder))
        src_path = (model.source or {}).get("path")  # an artifact's names where its float model once was: not used
        if not model.is_artifact and kind != "bundled" and isinstance(src_path, str) and Path(src_path).is_absolute():
            paths.append(Path(src_path))
    if kind in ("gguf", "bundled"):
        paths += [sources.cache_root() / "models", sources.cache_root() / "gguf"]
    return paths


def check_out_vs_input(out: str | Path, model, what: str = "output folder") -> None:
    """Refuse an --out that is the input model, lies inside it or holds it (with --force it would
    replace the source), and the paths lowbit.model.artifact.out_target refuses, before any work."""
    target = out_target(out, what)
    for p in _input_paths(model):
        try:
            src = Path(os.path.abspath(p)).resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if target == src or src in target.parents or target in src.parents:
            how = "is" if target == src else "is inside" if src in target.parents else "holds"
            raise LowbitError(f"{what} {out}: {how} the input model's {src}; writing there would replace or mix "
                              f"with the source; fix: choose an --out outside {src}")


# -- load / quantize / save ------------------------------------------------------------------------
def load(path: str | Path, *, load_in_4bit: bool = False, load_in_8bit: bool = False, quant_type: str = "nf4",
         double_quant: bool = True, group_size: int = 64, compute_dtype: torch.dtype | None = None,
         say: Say | None = None) -> Model:
    """Load a model: a lowbit artifact, or a float model (Hugging Face folder, GGUF, bundled name,
    compressed-tensors folder).

    With load_in_4bit (quant_type "nf4" or "int4") or load_in_8bit, the float weights are quantized
    while they stream in, one tensor at a time; compute_dtype (default bfloat16) is what the
    dequantized weights and the rest of the model compute in.
    """
    if load_in_4bit and load_in_8bit:
        raise LowbitError("load: choose one of load_in_4bit and load_in_8bit")
    if not (load_in_4bit or load_in_8bit):
        return load_model(path, compute_dtype or torch.float32, progress=say)
    if load_in_8bit:
        spec = QuantSpec(kind="int", bits=8, granularity="channel")
    elif quant_type == "nf4":
        spec = QuantSpec(kind="nf4", bits=4, granularity="group", group_size=group_size, double_quant=double_quant)
    elif quant_type == "int4":
        spec = QuantSpec(kind="int", bits=4, granularity="group", group_size=group_size, symmetric=False,
                         scale_dtype="float16")
    else:
        raise LowbitError(f"load: quant_type '{quant_type}' is unknown; use 'nf4' or 'int4'")
    recipe = Recipe(scheme=spec, name=f"load-{'8bit' if load_in_8bit else quant_type}", group_fallback="shrink")
    return load_streaming(path, recipe, compute_dtype or torch.bfloat16, progress=say)


def quantize(model: Model | nn.Module | str | Path, recipe: Recipe | str | Path = "int8", *,
             calib: CalibConfig | None = None, out: str | Path | None = None, force: bool = False,
             tokenizer=None, progress: Progress | None = None, say: Say | None = None) -> Model:
    """Quantize with a Recipe, a preset name or a recipe file; returns the lowbit.Model.

    `model` is a lowbit.Model (quantized in place), a bare nn.Module (wrapped; pass `tokenizer` to
    calibrate or save it), or a path / bundled name: then the checkpoint is read from disk, block by
    block when calibrating, so a model larger than memory can be quantized. Calibration runs when
    `calib` is given or the recipe's algorithm needs it (the method: calib.method, else GPTQ for an RTN
    recipe, else the recipe's algorithm). With `out`, the artifact is written there too (atomically).
    """
    rec = resolve_recipe(recipe)
    calibrated = calib is not None or rec.algorithm != "rtn"
    if calibrated and calib is None:
        calib = CalibConfig()
    if out is None:
        return _quantize(model, rec, calib, calibrated, None, force, tokenizer, progress, say)
    check_out_vs_input(out, model)
    with output_lock(out, force):  # no other run writes out until this one has renamed its artifact there
        prepare_out_dir(Path(out), force)  # fail before the slow part
        return _quantize(model, rec, calib, calibrated, out, force, tokenizer, progress, say)


def _quantize(model, rec: Recipe, calib, calibrated: bool, out, force: bool, tokenizer, progress, say) -> Model:
    if isinstance(model, (str, Path)):
        if calibrated:  # saved from the stored form, before the kernels repack the weights; with `out`, the
            # modules pick their kernels on first use (packing them all at once is the memory peak otherwise)
            return calibrate_checkpoint(model, rec, calib, out=out, progress=progress, force=force,
                                        say=say or (lambda msg: None), kernels=out is None)
        handle = load_model(model, progress=say)
    else:
        handle = as_model(model, tokenizer)
    if handle.quantized:
        raise LowbitError(f"quantize: model {handle.name} is already quantized (recipe '{handle.recipe.name}'); "
                          f"fix: quantize the float model")
    if calibrated:
        calibrate(handle, rec, calib, progress)
    else:
        handle.plan, handle.recipe = quantize_model(handle.module, rec, progress), rec
    if out is not None:
        save_artifact(handle, out, force)
    return handle


def save(model: Model, out: str | Path, *, force: bool = False) -> Path:
    """Write a quantized model as a lowbit artifact folder (atomically). The model needs its tokenizer."""
    handle = as_model(model)
    check_out_vs_input(out, handle)
    with output_lock(out, force):
        return save_artifact(handle, out, force)


# -- evaluate / gate / bench -----------------------------------------------------------------------
def evaluate(baseline: Model | str | Path, candidate: Model | str | Path, *, suites: tuple[str, ...] | None = None,
             config: EvalConfig | None = None, say: Say | None = None) -> dict:
    """Compare a candidate with its baseline on identical tokens: perplexity, KL divergence, top-1
    agreement, worst samples, and the suites (general, jargon, long_context, json; user JSONL files in
    config.user_files). Models already in memory are used as they are; paths are loaded. Returns the run
    dict (lowbit.eval.types documents its shape)."""
    config = config or EvalConfig()
    if suites is not None:
        config = EvalConfig(**{**config.__dict__, "suites": tuple(suites)})
    check_user_files(config.user_files, config.structured_file)
    base, cand = load_pair(baseline, candidate, say or (lambda s: None))
    return _evaluate(base, cand, config, say or (lambda s: None))


def gate(spec, baseline: Model | str | Path, candidate: Model | str | Path, *, quick: bool = False,
         kv_cache: str | None = None, say: Say | None = None, reuse: dict | None = None) -> dict:
    """Check a candidate against success criteria (a YAML spec file, "default", or a parsed
    lowbit.eval.gate.Spec): the evaluation the
    spec asks for, the latency benchmark when it has latency criteria, and the verdict. Returns the run
    dict; run["gate"]["passed"] is the verdict and run["gate"]["criteria"] every row.
    reuse: the run of an earlier gate on this same candidate (the tuner's quality stage): its divergence
    is taken instead of measured again when it ran with the same eval settings and quick flag, and its
    process memory when the bench settings match too (run["settings"] records both)."""
    from lowbit.data.corpora import wikipedia_text
    from lowbit.eval.gate import Spec, load_spec
    from lowbit.eval.gate import evaluate as verdict

    say = say or (lambda s: None)
    sp = spec if isinstance(spec, Spec) else load_spec(str(spec))
    ev = sp.section("eval")
    names = tuple(n for n in SUITES if n == "general" or n in sp.suites)
    files = (sp.suites["user"]["file"],) if "user" in sp.suites else ()
    sfile = (sp.suites.get("structured") or {}).get("file")
    config = EvalConfig(suites=names, user_files=files, quick=quick, samples=ev.get("samples"),
                        seq_len=ev.get("seq_len"), context=ev.get("context"), kv_cache=kv_cache, structured_file=sfile)
    check_user_files(files, sfile)
    base, cand = load_pair(baseline, candidate, say)
    # --quick: a smoke-sized latency run (4 measured requests of 32-96 prompt tokens and 16 new tokens after 1
    # warm-up), unless the spec says otherwise
    cfg = BenchConfig(**{**({"requests": 4, "warmup": 1, "prompt_tokens": 64, "output_tokens": 16} if quick else {}),
                         **sp.section("bench")})
    held = held_error = None
    settings = _settings(config, cfg)
    same = reuse is not None and reuse.get("quick") == quick and (reuse.get("settings") or {}).get("eval") == settings["eval"]
    same_mem = same and reuse["settings"].get("bench") == settings["bench"] and bool(reuse.get("process_memory"))
    if same_mem and "rss_reduction_pct" in sp.section("memory"):
        say("process memory: measured by the earlier stage, reused")
    elif "rss_reduction_pct" in sp.section("memory"):  # fresh processes, left to run beside the evaluation
        from dataclasses import asdict

        from lowbit.benchmark.latency import HeldMemory
        from lowbit.eval import basecache

        say("process memory (a fresh process per model, beside the evaluation)")
        mem_key = {"config": asdict(cfg), "threads": torch.get_num_threads()}
        base_mem = basecache.lookup("process_memory", base, mem_key)  # a float baseline's: measured once
        try:
            held = HeldMemory(base, cand, wikipedia_text(), cfg, {"baseline": base_mem} if base_mem else None)
        except (LowbitError, RuntimeError, OSError) as e:
            held_error = f"{type(e).__name__}: {e}"
    try:
        run = _evaluate(base, cand, config, say, reuse_divergence=reuse.get("divergence") if same else None)
    except BaseException:
        if held is not None:
            held.close()
        raise
    run["kind"] = "gate"
    run["settings"] = settings
    if same_mem and "rss_reduction_pct" in sp.section("memory"):
        run["process_memory"] = reuse["process_memory"]
    if held is not None:  # before the latency benchmark: nothing else may run while it times
        try:
            run["process_memory"] = held.result()
            if not base_mem:
                basecache.store("process_memory", base, mem_key, run["process_memory"]["baseline"])
        except (LowbitError, RuntimeError, OSError) as e:
            held_error = f"{type(e).__name__}: {e}"
    if held_error:
        run["process_memory_error"] = held_error
    # a measurement that cannot run fails its criteria with the reason (gate.evaluate); it never passes
    if sp.section("latency"):
        say("latency benchmark")
        try:
            run["bench"] = bench_pair(base, cand, wikipedia_text(), cfg, measure_rss=False)
        except (LowbitError, RuntimeError, OSError) as e:
            run["bench_error"] = f"{type(e).__name__}: {e}"
    run["gate"] = verdict(sp, run)
    return run


def _settings(config: EvalConfig, cfg: BenchConfig) -> dict:
    """What a gate's divergence and process memory depend on, to tell whether an earlier run's can be reused."""
    from dataclasses import asdict

    return {"eval": {"n_seq": config.n_seq, "n_samples": config.n_samples, "worst": config.worst,
                     "kv_cache": config.kv_cache}, "bench": asdict(cfg)}


def bench(baseline: Model | str | Path, candidate: Model | str | Path, *, config: BenchConfig | None = None,
          quick: bool = False, measure_rss: bool = True, progress: Progress | None = None, say: Say | None = None) -> dict:
    """Measure both models on the same prompts, request by request alternating: weight bytes, peak RSS
    (each model in a fresh process), prefill/decode tokens/s, TTFT and p50/p95/p99 latency. Returns the
    run dict; run["bench"] holds the numbers and their candidate/baseline ratios."""
    from lowbit.data.corpora import wikipedia_text

    config = config or BenchConfig(**({"requests": 4} if quick else {}))
    base, cand = load_pair(baseline, candidate, say or (lambda s: None))
    run = {"kind": "bench", "created": _now(), "lowbit_version": __version__, "quick": quick,
           "baseline": identity(base), "candidate": identity(cand)}
    t0 = time.perf_counter()
    run["bench"] = bench_pair(base, cand, wikipedia_text(), config, progress=progress, measure_rss=measure_rss)
    run["seconds"] = time.perf_counter() - t0
    return run


# -- export / generate -----------------------------------------------------------------------------
def export(model: Model | str | Path, *, format: str, out: str | Path, type: str = "auto", force: bool = False,
           from_float: bool = True, progress=None, say: Say | None = None):
    """Write a model in a runtime's format: "gguf" (llama.cpp; `type` is a GGUF type or "auto", each
    lowbit scheme to its closest type) or "compressed-tensors" (transformers, vLLM). Schemes a format
    cannot hold are refused with the nearest choices; non-exact mappings are requantized and listed in
    the result's notes. GGUF tensors that are not exact block types (and every tensor of a K-quant mix)
    are quantized from the float model the artifact names when its files are still there and match
    the sha256 lowbit.json recorded (from_float=False: from lowbit's own weights, a second rounding);
    the notes say which. Returns lowbit.exporters.gguf.GGUFExport or lowbit.exporters.compressed.CTExport."""
    fmt, out = format.lower(), Path(out)
    if fmt not in EXPORT_FORMATS:
        raise LowbitError(f"--format '{format}': unknown; use gguf or compressed-tensors")
    if fmt == "gguf":
        from lowbit.exporters.gguf import normalize_type

        gguf_type = normalize_type(type)
    elif type != "auto":
        raise LowbitError("--type: applies to --format gguf only; compressed-tensors keeps each module's lowbit scheme")
    what = "output file" if fmt == "gguf" else "output folder"
    check_out_vs_input(out, model, what)
    with output_lock(out, force, what):  # held from these checks to the rename
        if fmt == "gguf":
            prepare_out_file(out, force)
        else:
            prepare_out_dir(out, force)
        return _export(model, fmt, out, gguf_type if fmt == "gguf" else None, force, from_float, progress, say)


def _export(model, fmt: str, out: Path, gguf_type: str | None, force: bool, from_float: bool, progress, say):
    handle = load_model(model, progress=say) if isinstance(model, (str, Path)) else as_model(model)
    if fmt == "gguf":
        from lowbit.exporters.gguf import write_gguf

        # an artifact's lowbit.json names where its float model was: the tokenizer is taken from it only for a
        # bundled source (gguf_vocab verifies the installed file by its sha256); its weights are read (for tensors
        # that are not exact blocks) only when they hash to the recorded sha256 (exporters.gguf_source)
        source = handle.source if not handle.is_artifact or handle.source.get("kind") == "bundled" else None
        return write_gguf(handle.module, out, gguf_type, source, handle.folder, handle.imatrix,
                          name=str((handle.source or {}).get("name") or handle.name), progress=progress, force=force,
                          use_float_source=from_float)
    from lowbit.exporters.compressed import write_compressed

    return write_compressed(handle, out, force, progress)


def export_summary(res) -> str:
    """One line on what an export wrote: which tensor types or formats, how many."""
    if hasattr(res, "tensor_types"):
        return ", ".join(f"{k} x{v}" for k, v in Counter(res.tensor_types.values()).most_common())
    return ", ".join(sorted(set(res.formats.values())))


def check_generate_options(prompt: str, kv_cache: str | None, engine: str, max_new_tokens: int = 64,
                           model: Model | nn.Module | str | Path | None = None) -> None:
    """Bad generation options fail before any model loads: an empty or oversized prompt, a
    max_new_tokens outside 1..MAX_NEW_TOKENS or beyond the context of the model's config (read from
    the folder's config.json when `model` is a path; the prompt's own tokens are checked once it is
    tokenized), an unknown KV-cache format or engine."""
    from lowbit.model.kvcache import check_kind
    from lowbit.runtime.generate import ENGINES, MAX_PROMPT_CHARS, check_max_new_tokens

    if not isinstance(prompt, str) or not prompt.strip():
        raise LowbitError("--prompt is empty; give some text to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise LowbitError(f"--prompt: {len(prompt)} characters, more than lowbit generates from ({MAX_PROMPT_CHARS}); "
                          f"fix: shorten the prompt")
    if kv_cache is not None:
        check_kind(kv_cache, "--kv-cache")
    if engine not in ENGINES:
        raise LowbitError(f"--engine: '{engine}' is unknown; use one of {', '.join(ENGINES)}")
    check_max_new_tokens(max_new_tokens, *(_context_before_load(model) or (None, "")))


def _context_before_load(model) -> tuple[int, str] | None:
    """(context length, where it was read) of a model without loading it, where that is cheap: a
    folder's config.json, or a loaded module's config; None otherwise (GGUF, bundled names)."""
    import json

    from lowbit.model import sources
    from lowbit.runtime.generate import context_length

    if model is None:
        return None
    if isinstance(model, (str, Path)):
        try:
            src = sources.resolve(model)
        except LowbitError:
            return None  # loading names the problem
        cfg_path = src.path / "config.json"
        if src.kind not in ("lowbit", "hf", "compressed-tensors") or not cfg_path.is_file():
            return None
        try:
            if cfg_path.stat().st_size > (1 << 20):
                return None  # the loader judges an oversized config
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            return None
        n = context_length(cfg)
        return None if n is None else (n, f"{cfg_path}: max_position_embeddings")
    module = model.module if isinstance(model, Model) else model
    n = context_length(getattr(module, "config", None))
    return None if n is None else (n, "the model config's max_position_embeddings")


def engine_for(model: Model, engine: str, kv_cache: str) -> str:
    """The decode loop generation will run (and, for the lean loop, its native path)."""
    from lowbit.runtime.decode import engine_label
    from lowbit.runtime.generate import pick_engine

    used = pick_engine(model.module, engine)
    return engine_label(model.module, kv_cache) if used == "lean" else used


@dataclass
class Generated:
    text: str
    tokens: int  # new tokens
    seconds: float
    engine: str  # which decode loop ran, and on which native path

    def __str__(self) -> str:
        return self.text


def generate(model: Model | str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             chat: bool = True, kv_cache: str | None = None, engine: str = "auto",
             on_text: Callable[[str], None] | None = None) -> Generated:
    """Generate a continuation of `prompt` (wrapped in the model's chat template when chat and it has
    one), streaming text pieces to on_text as they come. kv_cache None: the model's own (its recipe's);
    engine: auto (the lean loop where the architecture allows), lean or hf."""
    from lowbit.runtime.generate import generate_text

    check_generate_options(prompt, kv_cache, engine, max_new_tokens, model)
    handle = load_model(model) if isinstance(model, (str, Path)) else as_model(model)
    tok = handle.need_tokenizer("generate")
    kv = kv_cache or handle.kv_cache
    label = engine_for(handle, engine, kv)
    pieces: list[str] = []

    def emit(s: str) -> None:
        pieces.append(s)
        if on_text is not None:
            on_text(s)

    t0 = time.perf_counter()
    n = generate_text(handle.module, tok, prompt, max_new_tokens, temperature, chat, on_text=emit, kv_cache=kv,
                      engine=engine)
    return Generated("".join(pieces), n, time.perf_counter() - t0, label)


__all__ = ["Model", "load", "quantize", "save", "evaluate", "gate", "bench", "export", "generate", "Generated",
           "CalibConfig", "EvalConfig", "BenchConfig", "Recipe", "preset", "PRESETS", "method_for", "export_summary"]
