"""The `lowbit` command line. Each subcommand calls public functions; bad input exits 2 with one paragraph."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markdown import Markdown
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lowbit.version import __version__
from lowbit.errors import LowbitError

app = typer.Typer(
    help="lowbit: quantize an LLM (INT8, INT4, NF4, FP8) and prove it is still good enough to ship.\n\n"
         "Start with: lowbit quantize --model smollm2-135m --recipe w4-g128 --out out/smollm2-w4",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from lowbit import native

            native.requested_isa()  # a bad LOWBIT_ISA fails before any work
            return fn(*args, **kwargs)
        except LowbitError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@app.command()
@_handle_errors
def quantize(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Bundled model name, Hugging Face folder, or .gguf file."),
    recipe: str = typer.Option("int8", "--recipe", "-r", help="Preset name (see `lowbit presets`) or a recipe .yaml/.json file."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the artifact to (written atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already exists."),
    method: Optional[str] = typer.Option(None, "--method",
        help="rtn (no calibration), rtn-mse (MSE-optimal clipping), gptq, awq, awq-gptq (AWQ scales, then GPTQ rounding), "
             "smoothquant (W8A8 recipes), or learned (rounding offsets and group ranges learned block by block "
             "against the float model's activations; --learn-steps, --learn-init, --learn-loss, --learn-e2e-steps). "
             "Default: the recipe's algorithm, or gptq when --calib is given."),
    calib: Optional[str] = typer.Option(None, "--calib",
        help="Calibration prompts: a .txt file, a .jsonl file (a 'text' field or chat 'messages'), or a built-in "
             "set: mix (default), wikipedia, python-docs."),
    samples: int = typer.Option(128, "--samples", min=1, help="Calibration windows."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Tokens per calibration window."),
    damp: float = typer.Option(0.01, "--damp", min=0.0, help="GPTQ dampening: fraction of mean(diag H) added to H."),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="GPTQ: quantize important columns first."),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="SmoothQuant migration strength."),
    learn_steps: int = typer.Option(200, "--learn-steps", min=1, max=100_000, help="--method learned: signSGD steps per block."),
    learn_init: str = typer.Option("rtn", "--learn-init",
        help="--method learned: start from round to nearest (rtn; offsets and ranges learned), from GPTQ's "
             "rounding (gptq; offsets only) or from AWQ's scaled weights and clipped ranges (awq; offsets and "
             "ranges). A gptq or awq start is kept wherever learning does not lower the held-back loss."),
    learn_loss: str = typer.Option("relative", "--learn-loss",
        help="--method learned: the block loss. relative (each token's squared error over its float "
             "activation's squared norm, so the first token's huge activations do not drown the rest), normed "
             "(relative, each channel weighted by the squared gain of the norms that next read it, so channels "
             "those norms scale down count less), postnorm (the relative error after those norms, applied "
             "whole: their gains and their division by each token's RMS), lookahead (postnorm at this block's "
             "output and again after the next block, run in float on it, averaged: the error as the next "
             "block passes it on; one more float block in memory, about twice the time) or mse."),
    learn_e2e_steps: int = typer.Option(0, "--learn-e2e-steps", min=0, max=100_000,
        help="--method learned: after the blocks, tune every block's group scales together (codes fixed) for this "
             "many Adam steps against the float model's next-token distribution (KL through the final norm "
             "and the head), kept only if the KL on held-back windows drops. 0 (default): off. Costs two "
             "forward passes and a backward pass of the whole model per window (each block is run again in the "
             "backward pass, so one block's float weights are held at a time), the codes at one byte a weight, "
             "and the window's logits in memory."),
    learn_e2e_lr: float = typer.Option(1e-3, "--learn-e2e-lr", min=0.0, help="--learn-e2e-steps: Adam's learning rate on log(scale)."),
    learn_e2e_batch: int = typer.Option(1, "--learn-e2e-batch", min=1, help="--learn-e2e-steps: calibration windows per step."),
) -> None:
    """Quantize a model with a recipe and write a lowbit artifact folder.

    With --method other than rtn (or --calib), the model is calibrated and quantized block by block,
    streaming its weights from disk, so peak memory is about one block plus the calibration activations.

    Example: lowbit quantize --model smollm2-135m --recipe w4-g128 --method gptq --calib mix --samples 128 --seq-len 512 --out out/smollm2-w4-gptq
    """
    from lowbit import api
    from lowbit.calib import CalibConfig, method_for
    from lowbit.recipe import resolve_recipe

    rec = resolve_recipe(recipe)
    cfg = None
    if method == "rtn" and not calib:  # plain round-to-nearest, whatever the recipe's algorithm says
        rec = replace(rec, algorithm="rtn")
    elif method or calib or rec.algorithm != "rtn":
        cfg = CalibConfig(method=method, data=calib or "mix", samples=samples, seq_len=seq_len, damp=damp,
                          act_order=act_order, alpha=alpha, learn_steps=learn_steps,
                          learn_init=learn_init, learn_loss=learn_loss, learn_e2e_steps=learn_e2e_steps,
                          learn_e2e_lr=learn_e2e_lr, learn_e2e_batch=learn_e2e_batch)
    method = method_for(rec, cfg)
    _quiet_transformers()
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task(f"Quantizing ({method}, {rec.name})", total=None)

        def step(msg: str, i: int, total: int) -> None:
            prog.update(task, total=total, completed=i, description=f"{method}: {msg}")

        q = api.quantize(model, rec, calib=cfg, out=out_dir, force=force, progress=step,
                            say=lambda msg: err.print(msg, highlight=False))  # writes out_dir too
    plans = q.plan
    fell = (q.calibration or {}).get("rtn_fallbacks")
    if fell:
        err.print(f"[yellow]note:[/] {len(fell)} module(s) fell back to round-to-nearest, e.g. {fell[0]}", highlight=False)
    notes: dict[str, list[str]] = {}
    for p in plans:
        if p.note:
            notes.setdefault(p.note, []).append(p.name)
    for note, names in notes.items():
        err.print(f"[yellow]note:[/] {note} in {len(names)} module(s), e.g. {names[0]}", highlight=False)
    from lowbit.exporters.inspect import artifact_summary

    s = artifact_summary(out_dir)
    n_q = sum(p.spec is not None for p in plans)
    out.print(f"Wrote {out_dir}: {n_q} of {len(plans)} linear modules quantized with '{rec.name}' ({method}), "
              f"{_human(s['bytes_on_disk'])} on disk, {s['linear_bits_per_weight']:.2f} bits/weight in quantized "
              f"linears, {s['model_bits_per_weight']:.2f} over the whole model ({time.perf_counter() - t0:.0f} s).",
              highlight=False)


@app.command()
@_handle_errors
def export(
    artifact: str = typer.Argument(..., help="A lowbit artifact folder (any other model `quantize` accepts is exported as float)."),
    fmt: str = typer.Option(..., "--format", "-f", help="gguf (llama.cpp) or compressed-tensors (transformers; the format vLLM reads, untested with vLLM here)."),
    gguf_type: str = typer.Option("auto", "--type", "-t",
                                  help="GGUF tensor type: auto (each lowbit scheme to its closest type, exact ones block for "
                                       "block), F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, or a llama.cpp K-quant mix: "
                                       "Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q3_K_M, Q2_K, IQ4_NL (needs llama-cpp-python)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="The .gguf file, or the compressed-tensors folder (written atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already exists."),
    from_codes: bool = typer.Option(False, "--from-codes", help="GGUF: requantize tensors that are not exact block types "
                                    "from lowbit's own weights, even when the float model the artifact names is there "
                                    "(default: from the float model when it matches its recorded sha256)."),
) -> None:
    """Export a lowbit artifact to a runtime's format: a GGUF file for llama.cpp, or a
    compressed-tensors folder for transformers (and vLLM, untested). Schemes a format cannot hold are refused
    with the nearest types; non-exact mappings are requantized and listed.

    Examples: lowbit export out/smollm2-w4 --format gguf --type Q4_K_M --out out/smollm2.gguf
              lowbit export out/smollm2-w4 --format compressed-tensors --out out/smollm2-ct
    """
    from lowbit import api
    from lowbit.api import export_summary

    _quiet_transformers()
    with err.status(f"Exporting {artifact} to {out_path} ..."):
        res = api.export(artifact, format=fmt, out=out_path, type=gguf_type, force=force, from_float=not from_codes,
                         say=lambda msg: err.print(msg))
    kinds = export_summary(res)
    for note in res.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"Wrote {out_path}: {_human(res.size)}; {res.exact} quantized weight(s) written exactly, "
              f"{res.requantized} requantized; {kinds}.", highlight=False)


@app.command()
@_handle_errors
def generate(
    model: str = typer.Argument(..., help="A lowbit artifact folder, or any model `quantize` accepts."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1,
        help="Tokens to generate (at most 16384; prompt tokens + these must fit the model's context)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy decoding."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template, if it has one."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="KV-cache format: none, int8 or fp8 (one scale per token and head); default: the artifact recipe's kv_cache."),
    engine: str = typer.Option("auto", "--engine", help="Decode loop: auto (lean where the architecture allows), lean, hf."),
) -> None:
    """Generate text from a model, streaming tokens as they come. Quantized modules run on the fastest
    CPU kernel their format has (see `lowbit info`); at batch 1 a Llama-layout or Gemma 3 model decodes
    each token in one call of lowbit's native code, on the best instruction-set path the CPU has
    (avx512vnni, avx512, avx2 or generic; LOWBIT_ISA forces one, LOWBIT_NATIVE=0 turns native code off).
    The memory the loaded model holds, the engine and the native path used are printed.

    Example: lowbit generate out/smollm2-w4 --prompt "Explain quantization in one sentence." --kv-cache int8
    """
    from lowbit import api
    from lowbit import native
    from lowbit.api import check_generate_options, engine_for
    from lowbit.model.qlinear import QLinear, kernel_summary

    check_generate_options(prompt, kv_cache, engine, max_new_tokens, model)  # limits from config.json, before loading
    _quiet_transformers()
    with err.status(f"Loading {model} ..."):
        m = api.load(model, say=lambda msg: err.print(msg))
    kernels_used = kernel_summary({n: q.plan for n, q in m.module.named_modules() if isinstance(q, QLinear) and q.plan})
    ktext = ", ".join(f"{k} x{v}" for k, v in kernels_used.items()) or "float"
    kv = kv_cache or m.kv_cache
    label = engine_for(m, engine, kv)
    err.print(f"[dim]model in memory: {_human(m.weight_bytes)}; kernels: {ktext}; engine: {label}; kv-cache: {kv}; "
              f"{native.describe()}[/]", highlight=False)
    res = api.generate(m, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat, kv_cache=kv_cache,
                          engine=engine,
                          on_text=lambda s: (out.print(s, end="", highlight=False, markup=False), sys.stdout.flush()))
    n, dt = res.tokens, res.seconds
    out.print()
    err.print(f"[dim]{n} tokens in {dt:.1f} s ({n / dt:.1f} tokens/s)[/]")


@app.command()
@_handle_errors
def info(
    artifact: Path = typer.Argument(..., help="A lowbit artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show an artifact's size on disk, bits per weight, and a per-module table.

    Example: lowbit info out/smollm2-w4
    """
    from lowbit.exporters.inspect import artifact_summary

    s = artifact_summary(artifact)
    if as_json:
        out.print_json(json.dumps(s))
        return
    src = s["source"]
    out.print(f"[bold]{artifact}[/]  recipe [cyan]{s['recipe']['name']}[/]  lowbit {s['lowbit_version']}", highlight=False)
    out.print(f"source: {src.get('name', '?')} ({src.get('kind', '?')}) sha256 {str(src.get('sha256', '?'))[:16]}...", highlight=False)
    out.print(f"size on disk: {_human(s['bytes_on_disk'])}   parameters: {s['parameters'] / 1e6:.1f} M   "
              f"bits/weight: {s['model_bits_per_weight']:.2f} whole model, {s['linear_bits_per_weight']:.2f} quantized linears",
              highlight=False)
    table = Table(show_lines=False)
    for col in ("module", "format", "out x in", "bytes", "bits/w", "CPU kernel"):
        table.add_column(col, overflow="fold")
    for row in s["modules"]:
        table.add_row(row["name"], row["format"], f"{row['out_features']}x{row['in_features']}", _human(row["bytes"]),
                      f"{row['bits_per_weight']:.2f}", row["path"])
    out.print(table)
    notes: dict[str, int] = {}
    for row in s["modules"]:
        if row["note"]:
            notes[row["note"]] = notes.get(row["note"], 0) + 1
    for note, n in notes.items():
        out.print(f"note: {note} ({n} module(s))", highlight=False)
    from lowbit import native

    out.print(f"CPU kernels here: {native.describe()}", highlight=False)


@app.command()
@_handle_errors
def presets() -> None:
    """List the built-in recipes.

    Example: lowbit presets
    """
    from lowbit.recipe import PRESETS

    table = Table()
    for col in ("preset", "scheme", "kept in high precision", "description"):
        table.add_column(col, overflow="fold")
    for name, r in PRESETS.items():
        table.add_row(name, r.scheme.label, ", ".join(r.ignore) + f" (+ embeddings, norms) as {r.keep_dtype}", r.description)
    out.print(table)


def _say(msg: str) -> None:
    err.print(f"[dim]{msg}[/]", highlight=False)


def _with_progress(steps: int, work):
    """work(say) under a progress bar of `steps` steps; each message after the first ends a step."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task("evaluating", total=steps)
        seen = [0]

        def say(msg: str) -> None:
            if seen[0]:
                prog.advance(task)
            seen[0] += 1
            prog.update(task, description=msg)

        result = work(say)
        prog.advance(task)
    return result


def _load_both(baseline: str, candidate: str):
    from lowbit import api

    _quiet_transformers()
    _say(f"loading baseline {baseline}")
    base = api.load(baseline, say=_say)
    _say(f"loading candidate {candidate}")
    return base, api.load(candidate, say=_say)


def _finish_run(run: dict, report_root: Path, no_report: bool) -> Path | None:
    """Write the HTML + Markdown report and record the run in the registry."""
    if no_report:
        return None
    from lowbit.report.html import write_report
    from lowbit.report.registry import record

    stamp = run["created"].replace(":", "").replace("-", "")
    folder = report_root / f"{run['kind']}-{stamp}"
    html_path, _ = write_report(run, folder)
    run_id = record(run, folder)
    err.print(f"report: {html_path}  (run #{run_id}; `lowbit runs` lists past runs)", highlight=False)
    return html_path


def _print_eval(run: dict) -> None:
    d = run["divergence"]
    out.print(f"[bold]{run['candidate']['name']}[/] vs baseline [bold]{run['baseline']['name']}[/] "
              f"({d['tokens']} tokens, {d['samples']} samples)", highlight=False)
    out.print(f"perplexity {d['ppl_baseline']:.3f} -> {d['ppl_candidate']:.3f} "
              f"({100 * (d['ppl_candidate'] / d['ppl_baseline'] - 1):+.2f}%)   mean KLD {d['mean_kld']:.4f}   "
              f"p99 KLD {d['p99_kld']:.4f}   worst sample KLD {d['max_sample_kld']:.4f}   top-1 agreement {d['top1']:.3f}",
              highlight=False)
    if run["suites"]:
        t = Table(title="suites")
        for col in ("suite", "metric", "baseline", "candidate", "delta", "n", "notes"):
            t.add_column(col, overflow="fold")
        for su in run["suites"]:
            t.add_row(su["name"], su["metric"], f"{su['baseline']:.3f}", f"{su['candidate']:.3f}", f"{su['delta']:+.3f}",
                      str(su["n"]), su.get("notes", ""))
        out.print(t)
    t = Table(title="worst samples (by mean KLD)")
    for col in ("sample", "ppl base", "ppl cand", "KLD", "text"):
        t.add_column(col, overflow="fold")
    for c in d["worst"]:
        t.add_row(c["id"], str(c["baseline"]), str(c["candidate"]), f"{c['score']:.4f}", c["text"][:80].replace("\n", " "))
    out.print(t)


@app.command("eval")
@_handle_errors
def eval_cmd(
    baseline: str = typer.Argument(..., help="The reference model: bundled name, HF folder, GGUF, or lowbit artifact."),
    candidate: str = typer.Argument(..., help="The model to judge (same tokenizer)."),
    suites: str = typer.Option("general,jargon,long_context,json,structured,json_tasks", "--suites",
                               help="Comma list of general, jargon, long_context, json (BFCL calls, generated), "
                                    "structured (KLD on JSON structure tokens of given answers), json_tasks (short "
                                    "JSON formatting tasks, generated), and user:FILE.jsonl."),
    quick: bool = typer.Option(False, "--quick", help="Small samples: about a minute on the bundled model."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="Wikipedia samples for divergence (16; quick 4)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=16, help="Tokens per sample (256; quick 128)."),
    context: Optional[int] = typer.Option(None, "--context", min=128, help="Long-context length (2048; quick 512)."),
    worst: int = typer.Option(5, "--worst", min=1, help="Worst samples to list."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Run the candidate with this KV cache (none, int8, fp8); default: its recipe's."),
    structured_file: Optional[str] = typer.Option(None, "--structured-file", help="The structured suite's own samples: a "
                                                  "JSONL file of {\"prompt\": ..., \"answer\": <JSON>} (default: "
                                                  "Wikipedia extraction tasks and BFCL calls)."),
    report_dir: Path = typer.Option(Path("lowbit-reports"), "--report-dir", help="Where reports are written."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML/Markdown report and the registry."),
) -> None:
    """Compare a candidate with its baseline on identical tokens: perplexity, KL divergence, top-1
    agreement, the worst samples, and task suites (jargon, long context, JSON tool calls, your own JSONL).

    Example: lowbit eval smollm2-135m out/smollm2-w4 --quick
    """
    from lowbit import api
    from lowbit.eval.run import EvalConfig, check_user_files, load_pair, parse_suites

    names, files = parse_suites(suites)
    check_user_files(files, structured_file)
    base, cand = load_pair(*_load_both(baseline, candidate), _say)
    cfg = EvalConfig(suites=names, user_files=files, quick=quick, samples=samples, seq_len=seq_len, context=context,
                     worst=worst, kv_cache=kv_cache, structured_file=structured_file)
    run = _with_progress(1 + len(names) + len(files), lambda say: api.evaluate(base, cand, config=cfg, say=say))
    _print_eval(run)
    _finish_run(run, report_dir, no_report)


@app.command()
@_handle_errors
def gate(
    spec: str = typer.Argument(..., help="A YAML success-criteria spec, or 'default'."),
    baseline: str = typer.Argument(..., help="The reference model."),
    candidate: str = typer.Argument(..., help="The model to judge."),
    quick: bool = typer.Option(False, "--quick", help="Small samples (for CI): under 30 s on the bundled model once "
                               "the baseline's side is cached (benchmarks/gate.py)."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="Run the candidate with this KV cache (none, int8, fp8); default: its recipe's."),
    report_dir: Path = typer.Option(Path("lowbit-reports"), "--report-dir", help="Where reports are written."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML/Markdown report and the registry."),
) -> None:
    """Check a candidate against success criteria; prints every criterion and exits 0 only if all pass
    (1 if any fails, 2 on bad input). `lowbit gate default ...` uses the built-in spec (docs/gate.md).

    Example: lowbit gate default smollm2-135m out/smollm2-int8 --quick
    """
    from lowbit import api
    from lowbit.eval.gate import load_spec
    from lowbit.eval.run import check_user_files, load_pair

    sp = load_spec(spec)  # a bad spec or user file fails before any model loads
    check_user_files((sp.suites["user"]["file"],) if "user" in sp.suites else (),
                     (sp.suites.get("structured") or {}).get("file"))
    base, cand = load_pair(*_load_both(baseline, candidate), _say)
    steps = (1 + len(sp.suites) + (1 if "general" not in sp.suites else 0) + (1 if sp.section("latency") else 0)
             + (1 if "rss_reduction_pct" in sp.section("memory") else 0))
    run = _with_progress(steps, lambda say: api.gate(sp, base, cand, quick=quick, kv_cache=kv_cache, say=say))
    t = Table(title=f"gate: {sp.source}")
    for col in ("criterion", "value", "", "threshold", "result"):
        t.add_column(col)
    for r in run["gate"]["criteria"]:
        val = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        t.add_row(r["name"], val, r["op"], f"{r['threshold']:g}", "[dim]n/a[/]" if r["passed"] is None else "[green]PASS[/]" if r["passed"] else "[red]FAIL[/]")
    out.print(t)
    _finish_run(run, report_dir, no_report)
    verdict = run["gate"]["passed"]
    out.print("[bold green]GATE PASSED[/]" if verdict else "[bold red]GATE FAILED[/]")
    raise typer.Exit(0 if verdict else 1)


@app.command()
@_handle_errors
def bench(
    baseline: str = typer.Argument(..., help="The reference model."),
    candidate: str = typer.Argument(..., help="The model to measure against it."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, help="Mean prompt length (the mix spans 0.5x-1.5x)."),
    output_tokens: int = typer.Option(32, "--output-tokens", min=1, help="Tokens generated per request."),
    batch_size: int = typer.Option(1, "--batch-size", min=1),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Requests in flight at once."),
    requests: Optional[int] = typer.Option(None, "--requests", min=1, help="Measured requests per model (12; quick 4)."),
    quick: bool = typer.Option(False, "--quick"),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="Measure peak RSS of each model in a fresh process."),
    engine: str = typer.Option("auto", "--engine", help="Decode loop: auto (lean where the architecture allows), lean, hf."),
    kv_cache: str = typer.Option("none", "--kv-cache", help="KV-cache format for both models: none, int8, fp8."),
    report_dir: Path = typer.Option(Path("lowbit-reports"), "--report-dir"),
    no_report: bool = typer.Option(False, "--no-report"),
) -> None:
    """Measure weight bytes, peak RSS, prefill and decode tokens/s, time to first token and p50/p95/p99
    latency, baseline and candidate alternating request by request (warm-up excluded).

    Example: lowbit bench smollm2-135m out/smollm2-int8 --quick
    """
    from lowbit import api
    from lowbit.benchmark.latency import BenchConfig

    cfg = BenchConfig(prompt_tokens=prompt_tokens, output_tokens=output_tokens, batch_size=batch_size,
                      concurrency=concurrency, engine=engine, kv_cache=kv_cache,
                      **({"requests": requests} if requests else {"requests": 4} if quick else {}))
    base, cand = _load_both(baseline, candidate)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task("benchmarking", total=None)

        def step(what: str, done: int, total: int) -> None:
            prog.update(task, description=f"bench: {what}", completed=done, total=total)

        run = api.bench(base, cand, config=cfg, quick=quick, measure_rss=rss, progress=step)
    b = run["bench"]
    t = Table(title="bench")
    for col in ("", "baseline", "candidate", "candidate / baseline"):
        t.add_column(col)
    rows = [("weight bytes", "weight_bytes", "weight_bytes", _human), ("prefill tok/s", "prefill_tok_s", "prefill_tok_s", lambda v: f"{v:.1f}"),
            ("decode tok/s", "decode_tok_s", "decode_tok_s", lambda v: f"{v:.1f}")]
    def num(v, fmt=lambda x: f"{x:.2f}") -> str:
        return "n/a" if v is None else fmt(v)

    for label, key, rkey, fmt in rows:
        t.add_row(label, num(b["baseline"][key], fmt), num(b["candidate"][key], fmt), num(b["ratios"].get(rkey)))
    for q in ("p50", "p95", "p99"):
        t.add_row(f"latency {q} (ms)", f"{b['baseline']['latency_ms'][q]:.0f}", f"{b['candidate']['latency_ms'][q]:.0f}", "")
        t.add_row(f"TTFT {q} (ms)", f"{b['baseline']['ttft_ms'][q]:.0f}", f"{b['candidate']['ttft_ms'][q]:.0f}", "")
    if b["baseline"].get("peak_rss_bytes"):
        t.add_row("peak RSS", _human(b["baseline"]["peak_rss_bytes"]), _human(b["candidate"]["peak_rss_bytes"]), "")
    out.print(t)
    _finish_run(run, report_dir, no_report)


@app.command()
@_handle_errors
def runs(
    limit: int = typer.Option(20, "--limit", min=1),
    kind: Optional[str] = typer.Option(None, "--kind", help="eval, gate, bench or serve."),
    show: Optional[int] = typer.Option(None, "--show", help="Print one run's stored JSON."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Comma list of run ids to put side by side."),
) -> None:
    """List past eval/gate/bench runs from the registry, show one, or compare several.

    Example: lowbit runs --compare 3,4
    """
    from lowbit.report.registry import compare_runs, get_run, list_runs

    if show is not None:
        out.print_json(json.dumps(get_run(show)))
        return
    if compare:
        try:
            ids = [int(x) for x in compare.split(",") if x.strip()]
        except ValueError:
            raise LowbitError(f"--compare: '{compare}' is not a comma list of run ids; see `lowbit runs`") from None
        rows = compare_runs(ids)
    else:
        rows = list_runs(limit=limit, kind=kind)
    if not rows:
        out.print("no runs recorded yet: `lowbit eval`, `lowbit gate` and `lowbit bench` record theirs")
        return
    t = Table()
    cols = list(rows[0].keys())
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols])
    out.print(t)



@app.command()
@_handle_errors
def tune(
    model: str = typer.Argument(..., help="The float model: bundled name, Hugging Face folder or .gguf file."),
    spec: str = typer.Option("default", "--spec", help="Success criteria: a gate spec YAML, or 'default' (docs/gate.md)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where the chosen model is written (a lowbit artifact)."),
    max_bits: Optional[float] = typer.Option(None, "--max-bits", help="Budget: bits per weight over the whole model."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Budget: stored weight bytes, e.g. 90MB."),
    min_memory_reduction: Optional[float] = typer.Option(None, "--min-memory-reduction",
                                                         help="Budget: percent below the float model's weight bytes."),
    method: str = typer.Option("gptq", "--method", help="How each trial quantizes: rtn, rtn-mse, gptq, awq, awq-gptq."),
    calib: str = typer.Option("mix", "--calib", help="Calibration prompts (.txt/.jsonl, or wikipedia, python-docs, mix)."),
    samples: int = typer.Option(16, "--samples", min=1, help="Calibration windows (sensitivity and trials)."),
    seq_len: int = typer.Option(256, "--seq-len", min=16, help="Tokens per calibration window."),
    measurement: Optional[Path] = typer.Option(None, "--measurement",
                                               help="Sensitivity file: read when it exists (same model), else written "
                                                    "(default: OUT-tune/measurement.json)."),
    menu: Optional[str] = typer.Option(None, "--menu", help="Comma list of formats the tuner may use (default: all of "
                                       "f16, int8-ch, int5-g32-asym, int5-g32, int4-g32-asym, int4-g32, int4-g64-asym, "
                                       "int4-g128-asym, int3-g64-asym, int3-g128-asym)."),
    gguf: bool = typer.Option(False, "--gguf", help="Only formats that are GGUF block types (Q8_0, Q5_0, Q5_1, Q4_0, "
                                                    "Q4_1, F16), and GPTQ without act-order, so the result exports to "
                                                    "GGUF block for block."),
    max_trials: int = typer.Option(8, "--max-trials", min=1, help="Candidates built and gated at most."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop after this long, e.g. 20m; the best "
                                              "trial so far is kept."),
    quick: bool = typer.Option(False, "--quick", help="Each trial's gate with small samples."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Find the smallest model that passes your criteria (or the best one under a size budget):
    measure every module's sensitivity, allocate formats, then quantize and gate candidates until one
    passes. Writes the model to --out and the recipe, trial table and report to OUT-tune/. Exit code 0
    when a trial passed, 1 when none did (the closest are listed), 2 on bad input.

    Example: lowbit tune smollm2-135m --spec default --out out/smollm2-tuned
    """
    from lowbit.eval.gate import load_spec
    from lowbit.tuner import TuneConfig, write_outputs
    from lowbit.tuner import tune as run_tune
    from lowbit.tuning import parse_duration, parse_size
    from lowbit.tuning.menu import GGUF_MENU, parse_menu

    sp = load_spec(spec)  # a bad spec fails before any model loads
    if gguf and menu:
        raise LowbitError("tune: give --gguf or --menu, not both")
    work = out_dir.parent / f"{out_dir.name}-tune"
    cfg = TuneConfig(spec=sp, max_bits=max_bits, max_size=parse_size(max_size) if max_size else None,
                     min_memory_reduction=min_memory_reduction, method=method, calib=calib, samples=samples,
                     seq_len=seq_len, measurement=measurement or work / "measurement.json",
                     menu=GGUF_MENU if gguf else parse_menu(menu), max_trials=max_trials,
                     time_budget_s=parse_duration(time_budget) if time_budget else None, quick=quick,
                     act_order=not gguf)
    cfg.check()
    def progress(what: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            _say(f"{what}: {done}/{total}")

    res = run_tune(model, cfg, out=out_dir, force=force, say=_say, progress=progress)
    paths = write_outputs(res, model, cfg, work, out_dir)
    t = Table(title=f"tune: {model}")
    for col in ("trial", "candidate", "method", "bits/w", "MB", "est. KLD", "mean KLD", "verdict"):
        t.add_column(col)
    for tr in res.trials:
        s = tr.summary()
        t.add_row(str(tr.index), s["how"], s["method"], f"{s['bits']:.2f}", f"{s['bytes'] / 1e6:.2f}", f"{s['est_kld']:.4g}",
                  "n/a" if s["mean_kld"] is None else f"{s['mean_kld']:.4g}",
                  "[green]PASS[/]" if s["passed"] else "[red]" + ("; ".join(s["failed"]) or s["stopped"] or "fail") + "[/]")
    out.print(t)
    for n in res.notes:
        out.print(f"note: {n}")
    out.print(f"recipe: {paths.get('recipe')}  report: {paths['html']}")
    if res.passed:
        out.print(f"[bold green]TUNED[/]: trial {res.best.index} saved to {res.out}")
        raise typer.Exit(0)
    out.print("[bold red]NO TRIAL PASSED[/]: nothing was saved to --out; the closest: "
              + ", ".join(f"trial {t.index} ({'; '.join(t.summary()['failed'])})" for t in res.closest))
    raise typer.Exit(1)


@app.command()
@_handle_errors
def qat(
    baseline: str = typer.Argument(..., help="The full-precision model (teacher, and the student's start)."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Preset or recipe file: the formats to train for (weight-only)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where the trained, quantized artifact is written (atomically)."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimizer steps."),
    data: str = typer.Option("mix", "--data", help="Training text: a .txt or .jsonl file, or mix, wikipedia, python-docs."),
    lr: float = typer.Option(1e-5, "--lr", help="Adam learning rate (decayed linearly to 0)."),
    batch: int = typer.Option(4, "--batch", min=1, help="Windows per step."),
    seq_len: int = typer.Option(256, "--seq-len", min=8, help="Tokens per window."),
    samples: int = typer.Option(256, "--samples", min=1, help="Windows read from --data."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, help="Steps between checkpoints (OUT.qat-state/)."),
    lora: int = typer.Option(0, "--lora", min=0, max=4096, help="Train rank-R adapters (peft) on the frozen quantized "
                             "base instead of every weight; they are merged and requantized at the end."),
    merge_tolerance: float = typer.Option(0.02, "--merge-tolerance", help="--lora: the largest mean KLD allowed "
                                          "between the trained model and its merged, requantized artifact."),
    spec: Optional[str] = typer.Option(None, "--spec", help="Gate both PTQ (round to nearest) and QAT with this spec "
                                       "('default' or a YAML file); without it, an evaluation of both."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Quantization-aware training with distillation: train the model's block weights through the
    recipe's exact fake quantizer against the full-precision model's distributions, then quantize and
    save. Resumes from OUT.qat-state/ after an interruption. Prints PTQ vs QAT against the same baseline.

    Example: lowbit qat smollm2-135m --recipe w4-g128 --out out/smollm2-w4-qat --steps 300 --data mix
    """
    from lowbit import api
    from lowbit import qat as qat_mod

    sp = None
    if spec:
        from lowbit.eval.gate import load_spec

        sp = load_spec(spec)  # a bad spec fails before training
    cfg = qat_mod.QATConfig(steps=steps, lr=lr, batch=batch, seq_len=seq_len, data=data, samples=samples,
                            checkpoint_every=checkpoint_every, lora_rank=lora, merge_tolerance=merge_tolerance).check()
    _quiet_transformers()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task("QAT", total=steps)

        def progress(done: int, total: int, loss: float) -> None:
            prog.update(task, completed=done, description=f"QAT (KL {loss:.4f})")

        res = qat_mod.train(baseline, recipe, out_dir, cfg, force=force, progress=progress, say=_say)
    kl = f"KL {res.losses[0]:.4f} -> {res.losses[-1]:.4f}" if res.losses else "no step run"
    mem = f"; peak RSS {res.peak_rss_bytes / 2**30:.2f} GiB" if res.peak_rss_bytes else ""
    merged = f"; merged adapters changed the outputs by a mean KLD of {res.merge_kld:.4f}" if res.merge_kld is not None else ""
    out.print(f"trained {res.steps} steps in {res.seconds / 60:.1f} min (resumed from step {res.resumed_from}); "
              f"{kl}{mem}{merged}; saved to {res.out}")
    _say("PTQ (round to nearest, same recipe) vs QAT against the baseline")
    base = api.load(baseline)
    ptq = api.quantize(api.load(baseline), recipe)
    cmp = qat_mod.compare(base, ptq, res.model, sp, quick=True)
    t = Table(title="PTQ vs QAT")
    for col in ("", "mean KLD", "top-1", "ppl") + (("gate",) if sp else ()):
        t.add_column(col)
    for name in ("ptq", "qat"):
        r = cmp["runs"][name]
        d = r["divergence"]
        t.add_row(name.upper(), f"{d['mean_kld']:.4f}", f"{d['top1']:.3f}", f"{d['ppl_candidate']:.2f}",
                  *((("[green]PASS[/]" if r["gate"]["passed"] else "[red]FAIL[/]"),) if sp else ()))
    out.print(t)
    if cmp["recovered_pct"] is not None:
        out.print(f"QAT recovered {cmp['recovered_pct']:.0f}% of PTQ's mean-KLD gap")


@app.command()
@_handle_errors
def recommend(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Bundled name, Hugging Face folder, .gguf or lowbit "
                                        "artifact (headers only; its measured runs come from the registry)."),
    scenario: Optional[str] = typer.Option(None, "--scenario", "-s", help="low-latency-chat, long-context, tool-calling, "
                                           "edge, batch-throughput (default: chosen from tasks and priorities)."),
    runtime: str = typer.Option("lowbit", "--runtime", "-r", help="lowbit (CPU kernels), llama.cpp (GGUF) or vllm "
                                "(compressed-tensors)."),
    cpu: str = typer.Option("auto", "--cpu", help="auto (this machine), avx512vnni, avx512, avx2, generic, arm-neon."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU name, e.g. h100, a100, rtx4090 (none: no GPU)."),
    memory: Optional[float] = typer.Option(None, "--memory", help="GB available for the model (GPU memory with a GPU, else RAM)."),
    priority: Optional[str] = typer.Option(None, "--priority", help="Comma list of latency, memory, quality, most "
                                           "important first (default: the scenario's)."),
    task: Optional[str] = typer.Option(None, "--task", help="Comma list of chat, json, long-context, jargon, code "
                                       "(default: the scenario's)."),
    write_spec_to: Optional[Path] = typer.Option(None, "--write-spec", help="Write the gate spec there (the commands name it)."),
    write_recipe_to: Optional[Path] = typer.Option(None, "--write-recipe", help="Write the starting recipe there when it "
                                                   "is not a preset."),
    force: bool = typer.Option(False, "--force", help="Replace existing --write-spec / --write-recipe files."),
    as_json: bool = typer.Option(False, "--json", help="Print the recommendation as JSON instead of Markdown."),
) -> None:
    """The decision guide: from your hardware, runtime, priorities and tasks to a strategy, a starting
    recipe with the reasons, a gate spec, the numbers measured here for the model (from `lowbit runs`)
    and the `lowbit tune` command to run next. docs/recommend.md lists the scenarios and rules.

    Example: lowbit recommend --scenario tool-calling --runtime llama.cpp -m smollm2-135m --write-spec spec.yaml
    """
    from lowbit.recommend import Target, write_recipe, write_spec
    from lowbit.recommend import recommend as guide

    target = Target(cpu_isa=cpu, gpu=gpu, memory_gb=memory, runtime=runtime, priorities=priority or (),
                    tasks=task or (), model=model, scenario=scenario)
    rec = guide(target, spec_file=str(write_spec_to or "spec.yaml"),
                recipe_file=str(write_recipe_to) if write_recipe_to else None)
    if write_spec_to:
        write_spec(rec, write_spec_to, force=force)
    if write_recipe_to:
        write_recipe(rec, write_recipe_to, force=force)
    if as_json:
        out.print_json(json.dumps(rec.to_dict(), default=str))
    else:
        out.print(Markdown(rec.to_markdown()))


@app.command()
@_handle_errors
def serve(
    candidate: str = typer.Option(..., "--candidate", help="The quantized model to roll out: a lowbit artifact folder, or any model `quantize` accepts."),
    fallback: str = typer.Option(..., "--fallback", help="The full-precision model: answers the rest of the traffic and every request the candidate fails."),
    canary: float = typer.Option(10.0, "--canary", min=0.0, max=100.0, help="Percent of routed requests the candidate answers (sticky per `user` / x-conversation-id)."),
    shadow: bool = typer.Option(False, "--shadow", help="Replay each answer to the other model off the client's path and score the pair (token agreement, KL divergence, JSON validity); in /metrics and `lowbit runs`."),
    spec: Optional[str] = typer.Option(None, "--spec", help="Gate spec ('default' or a YAML file): canary analysis over a sliding window steps the share up or rolls it back."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LOWBIT_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 and /admin (401 otherwise); at least 8 characters."),
    min_logprob: Optional[str] = typer.Option(None, "--min-logprob", help="Send candidate answers whose mean token log-prob is below this (e.g. -2.5) to the fallback; 'auto' (needs --shadow) calibrates the floor from shadow pairs: the highest that sends at most 2% of good answers to the fallback, set only once it catches bad ones."),
    queue_size: int = typer.Option(16, "--queue-size", min=1, help="Requests waiting or running per model; beyond it 429 with Retry-After."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, max=64, help="Waiting requests a model decodes together (the lean loop's batch)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Torch/native threads per model worker; default half the CPUs."),
    max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", min=1, help="Longest prompt accepted, in tokens."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", min=1, max=16384, help="The largest max_tokens a request may ask for."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per request; 504 past it."),
    candidate_timeout: float = typer.Option(30.0, "--candidate-timeout", help="Seconds the candidate gets before the fallback answers instead."),
    window: int = typer.Option(20, "--window", min=1, help="Canary analysis: events (shadow pairs or candidate requests) per judged window."),
    step: float = typer.Option(10.0, "--step", help="Canary analysis: points the share rises after a window that holds."),
    max_canary: float = typer.Option(100.0, "--max-canary", help="Canary analysis: the highest share it steps up to."),
    max_failures: int = typer.Option(2, "--max-failures", min=1, help="Canary analysis: failing windows in a row before rollback to 0."),
) -> None:
    """Serve a quantized candidate and its full-precision fallback behind one OpenAI-compatible API,
    with canary routing, fallback on bad output, shadow scoring and canary analysis (docs/serve.md).

    Example: lowbit serve --candidate out/smollm2-w4 --fallback smollm2-135m --canary 10 --shadow --spec default
    """
    from lowbit.serve import ServeConfig, run

    if min_logprob is not None and min_logprob != "auto":
        try:
            min_logprob = float(min_logprob)
        except ValueError:
            raise typer.BadParameter(f"{min_logprob!r} is neither a number (e.g. -2.5) nor 'auto'",
                                     param_hint="--min-logprob") from None
    run(ServeConfig(candidate=candidate, fallback=fallback, canary=canary, shadow=shadow, spec=spec, host=host, port=port,
                    api_key=api_key, min_mean_logprob=min_logprob, queue_size=queue_size, max_batch=max_batch,
                    threads=threads, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                    timeout_s=timeout, candidate_timeout_s=candidate_timeout, window=window, step_pct=step,
                    max_canary=max_canary, max_failures=max_failures))

def _version(value: bool) -> None:
    if value:
        out.print(f"lowbit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
