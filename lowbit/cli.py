"""The `lowbit` command line. Each subcommand calls public functions; bad input exits 2 with one paragraph."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lowbit import __version__
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
) -> None:
    """Quantize a model with a recipe and write a lowbit artifact folder.

    Example: lowbit quantize --model smollm2-135m --recipe w4-g128 --out out/smollm2-w4
    """
    from lowbit.export.native import prepare_out_dir, save_artifact
    from lowbit.model.load import load_model
    from lowbit.model.quantize import quantize_model
    from lowbit.recipe import resolve_recipe

    rec = resolve_recipe(recipe)
    prepare_out_dir(out_dir, force)  # fail before the slow part
    _quiet_transformers()
    t0 = time.perf_counter()
    with err.status(f"Loading {model} ..."):
        loaded = load_model(model, progress=lambda msg: err.print(msg))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task(f"Quantizing ({rec.name})", total=None)

        def step(name: str, i: int, total: int) -> None:
            prog.update(task, total=total, completed=i, description=f"Quantizing {name}")

        plans = quantize_model(loaded.model, rec, step)
    notes: dict[str, list[str]] = {}
    for p in plans:
        if p.note:
            notes.setdefault(p.note, []).append(p.name)
    for note, names in notes.items():
        err.print(f"[yellow]note:[/] {note} in {len(names)} module(s), e.g. {names[0]}", highlight=False)
    with err.status(f"Writing {out_dir} ..."):
        save_artifact(loaded.model, loaded.tokenizer, out_dir, loaded.source, force)
    from lowbit.export.inspect import artifact_summary

    s = artifact_summary(out_dir)
    n_q = sum(p.spec is not None for p in plans)
    out.print(f"Wrote {out_dir}: {n_q} of {len(plans)} linear modules quantized with '{rec.name}', "
              f"{_human(s['bytes_on_disk'])} on disk, {s['linear_bits_per_weight']:.2f} bits/weight in quantized "
              f"linears, {s['model_bits_per_weight']:.2f} over the whole model ({time.perf_counter() - t0:.0f} s).",
              highlight=False)


@app.command()
@_handle_errors
def generate(
    model: str = typer.Argument(..., help="A lowbit artifact folder, or any model `quantize` accepts."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy decoding."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Wrap the prompt in the model's chat template, if it has one."),
) -> None:
    """Generate text from a model, streaming tokens as they come.

    Example: lowbit generate out/smollm2-w4 --prompt "Explain quantization in one sentence."
    """
    from lowbit.model.generate import generate_text
    from lowbit.model.load import load_model

    if not prompt.strip():
        raise LowbitError("--prompt is empty; give some text to continue")
    _quiet_transformers()
    with err.status(f"Loading {model} ..."):
        loaded = load_model(model, progress=lambda msg: err.print(msg))
    m = loaded.model
    nbytes = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    err.print(f"[dim]model in memory: {_human(nbytes)}[/]")
    t0 = time.perf_counter()
    n = generate_text(m, loaded.tokenizer, prompt, max_new_tokens, temperature, chat,
                      on_text=lambda s: (out.print(s, end="", highlight=False, markup=False), sys.stdout.flush()))
    dt = time.perf_counter() - t0
    out.print()
    err.print(f"[dim]{n} tokens in {dt:.1f} s ({n / dt:.1f} tokens/s, reference path)[/]")


@app.command()
@_handle_errors
def info(
    artifact: Path = typer.Argument(..., help="A lowbit artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show an artifact's size on disk, bits per weight, and a per-module table.

    Example: lowbit info out/smollm2-w4
    """
    from lowbit.export.inspect import artifact_summary

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
    for col in ("module", "format", "out x in", "bytes", "bits/w", "compute path"):
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
