"""recommend(): the rules run in order for a Target, giving a Recommendation (strategy, starting recipe,
gate spec, measured runs, commands); write_spec and write_recipe write its files."""

from __future__ import annotations

import os
import re
import shlex
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError
from lowbit.eval.gate import parse_spec
from lowbit.recipe import PRESETS, Recipe
from lowbit.recommend.gate_spec import build_spec
from lowbit.recommend.guide import PRIORITIES, Guide, Scenario, load_guide
from lowbit.recommend.measured import measured_runs
from lowbit.recommend.modelinfo import ModelInfo, _gb, estimate_bytes, gguf_bytes, inspect_model
from lowbit.recommend.rules import (MAX_BITS, Decision, detect_isa, rule_cpu_isa, rule_head_int8, rule_kv_cache,
                                   rule_llamacpp, rule_memory_fit, rule_method, rule_priority_start, rule_scenario,
                                   rule_tune_bits, rule_tune_method, rule_vllm)
from lowbit.recommend.target import Target

# the lowbit-runtime recipes the memory rule walks, best quality first (sizes are estimated per model)
LOWBIT_LADDER = ("int8", "w4-g128-m", "w4-g32", "w4-g128")
NO_MEASUREMENTS = "no runs of this model in the registry (lowbit runs); the numbers below are not measured here"


# ---- the answer --------------------------------------------------------------------------------

@dataclass
class Recommendation:
    scenario: str
    strategy: str
    recipe: Recipe
    method: str  # rtn, gptq, awq, smoothquant, ... (lowbit.recipe.ALGORITHMS)
    kv_cache: str  # none or int8
    export: dict | None  # None (lowbit runtime) or {"format": ..., "type": ..., "command": ...}
    gate_spec: str  # YAML text of a complete spec (lowbit.eval.gate.parse_spec accepts it)
    reasons: list[str]
    measured: list[dict]
    tune_command: str  # "" when nothing fits the memory
    target: dict = field(default_factory=dict)  # the target as resolved (auto ISA, scenario defaults)
    keep: list[str] = field(default_factory=list)  # what stays in higher precision
    memory: dict | None = None  # the size estimates, when a model was given
    fits: bool = True  # False: no candidate fits the memory (the recipe is the smallest considered)
    measured_note: str = ""  # why `measured` is empty
    quantize_command: str = ""  # builds the starting point ("" when nothing fits)
    gate_command: str = ""  # gates the starting point with the spec
    recipe_file: str | None = None  # the recipe file the quantize command names (write_recipe), None for a preset

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "strategy": self.strategy, "recipe": self.recipe.to_dict(),
                "method": self.method, "kv_cache": self.kv_cache, "export": self.export, "gate_spec": self.gate_spec,
                "reasons": list(self.reasons), "measured": list(self.measured), "measured_note": self.measured_note,
                "tune_command": self.tune_command, "target": dict(self.target), "keep": list(self.keep),
                "memory": self.memory, "fits": self.fits, "quantize_command": self.quantize_command,
                "gate_command": self.gate_command, "recipe_file": self.recipe_file}

    def to_markdown(self) -> str:
        t = self.target
        lines = [f"# lowbit recommend: {self.scenario}", ""]
        hw = [f"runtime {t.get('runtime')}", f"CPU {t.get('cpu_isa')}", f"GPU {t.get('gpu') or 'none'}",
              f"memory {_gb(t['memory_gb'] * 1e9) if t.get('memory_gb') else 'not given'}"]
        lines += [f"Target: {', '.join(hw)}; priorities {', '.join(t.get('priorities') or [])}; "
                  f"tasks {', '.join(t.get('tasks') or [])}; model {t.get('model') or 'not given'}.", ""]
        lines += ["## Strategy", "", self.strategy, ""]
        lines += ["## Starting point", ""]
        label = "smallest considered, does not fit" if not self.fits else self.recipe.description or self.recipe.scheme.label
        lines += [f"- recipe: `{self.recipe.name}` ({label})", f"- method: `{self.method}`",
                  f"- KV cache: `{self.kv_cache}`"]
        if self.export:
            lines.append(f"- export: {self.export['format']}" + (f" `{self.export['type']}`" if self.export.get("type") else ""))
        lines += [f"- keep in higher precision: {k}" for k in self.keep] + [""]
        lines += ["## Why", ""] + [f"- {r}" for r in self.reasons] + [""]
        lines += ["## Measured here", ""]
        if self.measured:
            lines += ["| run | kind | candidate | recipe | bits/weight | weights | mean KLD | ppl change | gate | decode speedup |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in self.measured:
                lines.append("| " + " | ".join([
                    str(r["run_id"]), r["kind"], _cell(r["candidate"]), _cell(r["recipe"] or "-"),
                    _fmt(r["bits_per_weight"], "{:.2f}"), _gb(r["weight_bytes"]) if r["weight_bytes"] else "-",
                    _fmt(r["mean_kld"], "{:.4f}"), _fmt(r["ppl_change_pct"], "{:+.1f}%"),
                    "-" if r["gate_passed"] is None else ("PASS" if r["gate_passed"] else "FAIL"),
                    _fmt(r["decode_speedup"], "{:.2f}x")]) + " |")
        else:
            lines.append(self.measured_note or NO_MEASUREMENTS)
        lines.append("")
        if self.memory:
            m = self.memory
            lines += ["## Memory", "", f"{m['parameters'] / 1e6:,.1f} M parameters ({m['counted_from']}); "
                      f"budget for weights {_gb(m['budget_bytes'])} ({_gb(m['memory_bytes'])} less "
                      f"{m['headroom']:.0%} kept free). Estimates, not measurements.", "",
                      "| candidate | bits/weight (est.) | weights (est.) | fits |", "|---|---|---|---|"]
            for c in m["candidates"]:
                lines.append(f"| {c['name']} | {c['bits_per_weight']:.2f} | {_gb(c['bytes'])} | {'yes' if c['fits'] else 'no'} |")
            lines.append("")
        lines += ["## Gate spec", "", "```yaml", self.gate_spec.rstrip(), "```", "", "## Next", ""]
        if not self.tune_command:
            lines.append("No commands: nothing fits the memory given. Give more memory, or pick a smaller model.")
            return "\n".join(lines) + "\n"
        spec_file = self.tune_command.split(" --spec ", 1)[1].split(" ", 1)[0]
        files = f"the gate spec to `{spec_file}` (`--write-spec`)"
        if self.recipe_file:
            files += f" and the recipe to `{self.recipe_file}` (`--write-recipe`)"
        lines += [f"Write {files}. The starting point, built and gated:", "", "```sh", self.quantize_command,
                  self.gate_command] + ([self.export["command"]] if self.export else []) + ["```", ""]
        lines += ["The search for the smallest mix that passes the same gate (docs/tune.md):", "", "```sh",
                  self.tune_command]
        if self.export:
            lines.append(self.export["after_tune"])
        lines += ["```"]
        return "\n".join(lines) + "\n"


def _cell(x: Any) -> str:
    """A value as one Markdown table cell: no pipe or line break can split the row."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def _fmt(x: float | None, pattern: str) -> str:
    return "-" if x is None else pattern.format(x)


# ---- recommend ---------------------------------------------------------------------------------

def _model_slug(model: str) -> str:
    name = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def tune_command(model: str | None, spec_file: str, method: str, priorities: tuple[str, ...],
                 max_size_bytes: float | None, gguf: bool = False) -> str:
    """`lowbit tune MODEL --spec FILE (--max-bits B | --max-size NMB) --method M --out out/NAME-tuned [--gguf]`."""
    limit = f"--max-size {int(max_size_bytes // 1e6)}MB" if max_size_bytes else f"--max-bits {MAX_BITS[priorities[0]]}"
    out = f"out/{_model_slug(model or 'MODEL')}-tuned"
    return (f"lowbit tune {shlex.quote(model) if model else 'MODEL'} --spec {shlex.quote(spec_file)} {limit} "
            f"--method {method} --out {shlex.quote(out)}" + (" --gguf" if gguf else ""))


def recipe_arg(recipe: Recipe, recipe_file: str) -> str:
    """What `lowbit quantize --recipe` takes for this recipe: the preset's name when the recipe is that
    preset (the method aside), else the recipe file to write (write_recipe)."""
    p = PRESETS.get(recipe.name)
    if p is not None and replace(p, algorithm=recipe.algorithm).to_dict() == recipe.to_dict():
        return recipe.name
    return recipe_file


def _complete(priorities: tuple[str, ...], defaults: tuple[str, ...]) -> tuple[str, ...]:
    """The priorities given, then the others in the scenario's order (rules may look at the second)."""
    rest = [p for p in (*defaults, *PRIORITIES) if p not in priorities]
    return tuple(priorities) + tuple(dict.fromkeys(rest))


def _ladder(t: Target, sc: Scenario, guide: Guide, isa: str, take) -> tuple[str, list[str]]:
    """(starting candidate, the candidates the memory rule may walk to, best quality first)."""
    if t.runtime == "vllm":
        start = take(rule_vllm(t, sc, guide))
        return start, [start] + [n for n in ("w8a8-dynamic", "w4a16-g128-sym") if n != start]
    if t.runtime == "llama.cpp":
        start = take(rule_llamacpp(t.priorities))
        types = list(guide.gguf_types)
        return start, types[types.index(start):]
    start = take(rule_priority_start(t.priorities, sc)) or sc.recipe
    if t.gpu is not None:
        take(Decision(None, f"GPU {t.gpu}: lowbit's fast kernels are CPU kernels (the GPU speeds up calibration only); "
                            f"to serve on the GPU pick --runtime vllm"))
    start = take(rule_cpu_isa(guide.recipe(start), isa, t.priorities)) or start
    return start, [start] + [n for n in LOWBIT_LADDER if n != start]


def _candidates(t: Target, info: ModelInfo | None, guide: Guide, start: str, ladder: list[str]) -> list[tuple[str, int]]:
    """(name, estimated weight bytes) from the start down: GGUF types by their nominal bits, recipes per
    tensor; recipes larger than the start are dropped and the rest sorted biggest first."""
    if info is None or info.parameters is None:
        return [(n, 0) for n in ladder]
    if t.runtime == "llama.cpp":
        return [(n, gguf_bytes(info.parameters, guide.gguf_types[n]["bits"])) for n in ladder]
    sizes = {n: estimate_bytes(info.tensors, guide.recipe(n)) for n in ladder}
    rest = sorted((n for n in ladder if n != start and sizes[n] <= sizes[start]), key=lambda n: -sizes[n])
    return [(n, sizes[n]) for n in [start, *rest]]


def recipe_keeps(recipe: Recipe) -> list[str]:
    """What the recipe keeps apart from its main scheme, in words (from its overrides and ignores)."""
    lines = [f"{o.match}: {o.scheme.label if o.scheme is not None else 'unquantized, ' + recipe.keep_dtype}"
             for o in recipe.overrides]
    lines += [f"{pattern}: unquantized, {recipe.keep_dtype}" for pattern in recipe.ignore]
    return lines + [f"embeddings and norms: {recipe.keep_dtype} (a head tied to the embeddings serves both)"]


def _here(t: Target, recipe: Recipe, method: str, kv: str, gguf_type: str | None) -> str:
    what = f"{recipe.name} ({recipe.scheme.label}) with {method}"
    if t.runtime == "vllm":
        return f"Here, for vLLM on {t.gpu or 'a GPU'}: {what}, exported as compressed-tensors."
    if t.runtime == "llama.cpp":
        how = "written block for block" if gguf_type == "Q8_0" else "quantized by llama.cpp with the artifact's importance matrix"
        return (f"Here, for llama.cpp: an artifact of {recipe.name} ({recipe.scheme.label}, {method}), exported as "
                f"GGUF {gguf_type} ({how}).")
    return f"Here, for lowbit's CPU runtime on {t.cpu_isa}: {what}, KV cache {kv}."


def _export(runtime: str, gguf_type: str | None, slug: str, start_dir: str, guide: Guide, info: ModelInfo | None,
            model_arg: str) -> tuple[dict | None, list[str]]:
    """The export of the starting point ("command") and of the tuned model ("after_tune"), and notes."""
    tuned = f"out/{slug}-tuned"
    if runtime == "llama.cpp":
        notes = [f"export: `lowbit export --format gguf --type {gguf_type}` ({guide.gguf_types[gguf_type]['note']})"
                 + ("; Q8_0 is written block for block from this recipe's INT8 g32 codes" if gguf_type == "Q8_0" else ""),
                 "the tune command runs with --gguf: its formats are GGUF block types, so `--type auto` writes the "
                 "tuned model block for block, as it was gated"]
        if gguf_type != "Q8_0":
            notes.append(f"the gate command checks the 8-bit artifact; llama.cpp's {gguf_type} file can be compared "
                         f"too: `lowbit eval {model_arg} out/{slug}-{gguf_type}.gguf` (a GGUF loads dequantized, so its "
                         f"memory reads as float)")
        if info is not None and info.arch and info.arch not in ("llama", "LlamaForCausalLM"):
            notes.append(f"warning: lowbit's GGUF export writes the Llama architecture only; {info.name} is {info.arch}, "
                         f"so `lowbit export --format gguf` will refuse it")
        return {"format": "gguf", "type": gguf_type,
                "command": f"lowbit export {start_dir} --format gguf --type {gguf_type} --out out/{slug}-{gguf_type}.gguf",
                "after_tune": f"lowbit export {tuned} --format gguf --type auto --out out/{slug}-tuned.gguf"}, notes
    if runtime == "vllm":
        return {"format": "compressed-tensors", "type": None,
                "command": f"lowbit export {start_dir} --format compressed-tensors --out out/{slug}-ct",
                "after_tune": f"lowbit export {tuned} --format compressed-tensors --out out/{slug}-tuned-ct"}, \
            ["export: `lowbit export --format compressed-tensors`, the checkpoint format vLLM reads "
             "(loading in vLLM is untested by lowbit)"]
    return None, []


def recommend(target: Target, *, db: Path | None = None, spec_file: str = "spec.yaml", recipe_file: str | None = None,
              guide: Guide | None = None) -> Recommendation:
    """The strategy, starting recipe, gate spec, measured numbers and tune command for `target`.
    db: the run registry (default: lowbit.report.registry's); spec_file: the file the commands name for
    the gate spec (write it with write_spec); recipe_file: the file the quantize command names when the
    recipe is not a preset (default out/MODELNAME-recipe.yaml; write it with write_recipe); guide:
    another data file's Guide."""
    guide = guide or load_guide()
    reasons: list[str] = []

    def take(d: Decision | None) -> Any:
        if d is None:
            return None
        reasons.append(d.reason)
        return d.value

    isa = take(detect_isa()) if target.cpu_isa == "auto" else target.cpu_isa
    sc = guide.scenarios[take(rule_scenario(target, guide))]
    t = replace(target, cpu_isa=isa, scenario=sc.name, priorities=_complete(target.priorities or sc.priorities, sc.priorities),
                tasks=target.tasks or sc.tasks)
    reasons.extend(sc.reasons)
    info = inspect_model(t.model) if t.model else None
    model = t.model  # what the commands quantize from
    if info is not None and info.kind == "lowbit":
        model = info.float_model
        take(Decision(None, f"{t.model} is a lowbit artifact ({_gb(info.file_bytes)} of weights, already quantized): the "
                            f"commands start from the float model it names, "
                            + (f"{model} (check that it is still there)" if model else "unknown here (MODEL)")))

    start, ladder = _ladder(t, sc, guide, isa, take)
    fit, memory_table = rule_memory_fit(info, t.memory_gb, sc.memory_headroom,
                                        _candidates(t, info, guide, start, ladder), start)
    chosen, fits = take(fit)
    gguf_type = chosen if t.runtime == "llama.cpp" else None
    recipe = guide.recipe("gguf-q8_0" if gguf_type else chosen)
    recipe = take(rule_head_int8(recipe, t.tasks)) or recipe
    kv = take(rule_kv_cache(t, sc, t.runtime))
    method = take(rule_method(recipe, t, t.runtime, gguf_type))
    recipe = replace(recipe, algorithm=method, kv_cache=kv)
    slug = _model_slug(model or "MODEL")
    start_dir = f"out/{slug}-{recipe.name}"
    model_arg = shlex.quote(model) if model else "MODEL"
    export, notes = _export(t.runtime, gguf_type, slug, start_dir, guide, info, model_arg)
    reasons.extend(notes)

    fragments = [(f"scenario {sc.name}", sc.gate)]
    for task in t.tasks:
        if guide.tasks[task]["gate"]:
            fragments.append((f"task {task}", guide.tasks[task]["gate"]))
            reasons.append(guide.tasks[task]["reason"])
    if t.priorities[0] == "memory":
        fragments.append(("memory first", {"memory": {"reduction_pct": 70}}))
        reasons.append("memory first: the gate asks for at least 70% less weight memory than the baseline")
    gate_spec, notes = build_spec(fragments, t.runtime)
    reasons.extend(notes)

    measured, measured_note = [], "no model given: nothing to look up in the registry"
    if info is not None:
        measured = measured_runs(info, db=db)
        measured_note = "" if measured else NO_MEASUREMENTS
        failed = [m for m in measured if m["recipe"] == recipe.name and m["gate_passed"] is False]
        if failed:
            reasons.append(f"a recorded gate of {recipe.name} on this model failed (run {failed[0]['run_id']}): the tune "
                           f"command searches for a mix that passes")

    budget = memory_table["budget_bytes"] if memory_table else \
        (t.memory_gb * 1e9 * (1 - sc.memory_headroom) if t.memory_gb else None)
    tune_method = take(rule_tune_method(recipe, method, t.runtime))
    if budget is None and fits:
        take(rule_tune_bits(recipe, t.priorities, gguf_type, guide))
    rarg = recipe_arg(recipe, recipe_file or f"out/{slug}-recipe.yaml")
    quantize = (f"lowbit quantize --model {model_arg} --recipe {shlex.quote(rarg)} --method {method} "
                f"--out {shlex.quote(start_dir)}")
    gate = f"lowbit gate {shlex.quote(spec_file)} {model_arg} {shlex.quote(start_dir)}"
    strategy = f"{sc.strategy} {_here(t, recipe, method, kv, gguf_type)}"
    if not fits:
        strategy = f"{fit.reason[0].upper()}{fit.reason[1:]}. For a larger budget: {strategy}"
    keep = list(sc.keep) + recipe_keeps(recipe)
    if gguf_type and gguf_type != "Q8_0":
        keep.append(f"llama.cpp's {gguf_type} mix picks each tensor's type (its _M mixes give attn_v and ffn_down more bits)")
    return Recommendation(
        scenario=sc.name, strategy=strategy, recipe=recipe, method=method, kv_cache=kv, export=export,
        gate_spec=gate_spec, reasons=reasons, measured=measured,
        tune_command=tune_command(model, spec_file, tune_method, t.priorities, budget, gguf=gguf_type is not None)
        if fits else "",
        quantize_command=quantize if fits else "", gate_command=gate if fits else "",
        recipe_file=None if rarg == recipe.name else rarg,
        target={"cpu_isa": isa, "gpu": t.gpu, "memory_gb": t.memory_gb, "runtime": t.runtime,
                "priorities": list(t.priorities), "tasks": list(t.tasks), "model": t.model, "scenario": sc.name},
        keep=keep, memory=memory_table, fits=fits, measured_note=measured_note)


def _write_new(path: str | Path, text: str, force: bool, what: str) -> Path:
    """Write `text` to `path` atomically (a temporary file beside it, then a rename). An existing file is
    refused unless force; without force a hard link puts it in place, so a file created meanwhile is not
    replaced either."""
    path = Path(path)
    exists = LowbitError(f"{what} {path}: already exists; fix: pass --force to replace it, or another path")
    if path.exists() and not force:
        raise exists
    if not path.parent.is_dir():
        raise LowbitError(f"{what} {path}: folder {path.parent} does not exist; fix: create it or pick another path")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise exists from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise exists from None
                os.replace(tmp, path)
    except OSError as e:
        raise LowbitError(f"{what} {path}: cannot be written ({e.strerror or e}); fix: check the folder's permissions") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_spec(rec: Recommendation, path: str | Path, force: bool = False) -> Path:
    """Write rec.gate_spec (checked with parse_spec first) to `path`; see _write_new."""
    parse_spec(yaml.safe_load(rec.gate_spec), f"file {path}")  # never write a spec the gate would refuse
    return _write_new(path, rec.gate_spec, force, "spec file")


def write_recipe(rec: Recommendation, path: str | Path, force: bool = False) -> Path:
    """Write rec.recipe as a recipe file (`lowbit quantize --recipe PATH` reads it back); see _write_new."""
    text = yaml.safe_dump(rec.recipe.to_dict(), sort_keys=False)
    Recipe.from_dict(yaml.safe_load(text), f"recipe file {path}")
    return _write_new(path, text, force, "recipe file")
