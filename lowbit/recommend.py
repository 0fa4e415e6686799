"""The decision guide behind `lowbit recommend`: from a target (hardware, runtime, priorities, tasks,
optionally a model) to a strategy, a starting recipe, a gate spec, the numbers measured here, and the
`lowbit tune` command to run next.

    from lowbit.recommend import Target, recommend, write_spec
    rec = recommend(Target(runtime="llama.cpp", scenario="tool-calling", model="smollm2-135m", memory_gb=1))
    print(rec.to_markdown())
    write_spec(rec, "spec.yaml")          # the gate spec the tune command names

The scenarios, the extra recipes the rules use, the GGUF types and the FP8 GPUs are data
(lowbit/scenarios.yaml), checked key by key when loaded. The rules are the small `rule_*` functions
below; each returns a Decision (the value and the reason in words), and every reason ends up in
Recommendation.reasons, in the order the rules ran. Nothing here loads a model's weights: sizes come
from safetensors headers, GGUF tensor tables or lowbit.json, and measured numbers only from the run
registry (lowbit.report.registry); a number that was not measured here is never shown as if it was.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
import uuid
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lowbit.datafile import read_data_file
from lowbit.errors import LowbitError
from lowbit.eval.gate import DEFAULT_SPEC, parse_spec
from lowbit.exporters.gguf_types import LLAMA_CPP_TYPES, PY_TYPES
from lowbit.recipe import HEAD_INT8, PRESETS, Recipe

GUIDE_FILE = Path(__file__).with_name("scenarios.yaml")
GUIDE_VERSION = 1
ISAS = ("auto", "avx512vnni", "avx512", "avx2", "generic", "arm-neon")
RUNTIMES = ("lowbit", "llama.cpp", "vllm")
GGUF_TYPES = (*PY_TYPES, *LLAMA_CPP_TYPES)  # what `lowbit export --format gguf --type` writes
RUNTIME_ALIASES = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp"}
PRIORITIES = ("latency", "memory", "quality")
TASKS = ("chat", "json", "long-context", "jargon", "code")
NO_GPU = ("", "none", "cpu", "no")
# the methods `lowbit tune --method` takes (docs/tune.md; it searches weight-only integer mixes)
TUNE_METHODS = ("rtn", "rtn-mse", "gptq", "awq", "awq-gptq")
# --max-bits of the tune command, by the first priority
MAX_BITS = {"memory": 4.5, "latency": 4.5, "quality": 6.0}
# the lowbit-runtime recipes the memory rule walks, best quality first (sizes are estimated per model)
LOWBIT_LADDER = ("int8", "w4-g128-m", "w4-g32", "w4-g128")
# the recipe each first priority starts from when it is not the scenario's own first priority
PRIORITY_START = {"quality": "int8", "memory": "w4-g128", "latency": "w4-g128"}
NO_MEASUREMENTS = "no runs of this model in the registry (lowbit runs); the numbers below are not measured here"


# ---- the data file -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    priorities: tuple[str, ...]
    tasks: tuple[str, ...]
    strategy: str
    recipe: str  # a preset name, or a name under `recipes:` in the data file
    kv_cache: str
    keep: tuple[str, ...]
    gate: dict  # a gate spec fragment (docs/gate.md)
    memory_headroom: float  # the share of memory kept free of weights (KV cache, activations, runtime)
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Guide:
    scenarios: dict[str, Scenario]
    recipes: dict[str, Recipe]  # the data file's recipes; presets come from lowbit.recipe.PRESETS
    tasks: dict[str, dict]  # task -> {"gate": fragment, "reason": str}
    gguf_types: dict[str, dict]  # type -> {"bits": float, "note": str}, best quality first
    fp8_gpus: tuple[str, ...]

    def recipe(self, name: str) -> Recipe:
        if name in self.recipes:
            return self.recipes[name]
        if name in PRESETS:
            return PRESETS[name]
        raise LowbitError(f"recipe '{name}': neither a preset ({', '.join(PRESETS)}) nor a recipe of {GUIDE_FILE}")


SCENARIO_KEYS = {"description": str, "priorities": list, "tasks": list, "strategy": str, "recipe": str,
                 "kv_cache": str, "keep": list, "gate": dict, "memory_headroom": (int, float), "reasons": list}
TOP_KEYS = {"version", "scenarios", "recipes", "tasks", "gguf_types", "gpus"}
# names the rules refer to, so a data file must define them
SCENARIOS = ("low-latency-chat", "long-context", "tool-calling", "edge", "batch-throughput")
RULE_RECIPES = ("w4a16-g128-sym", "gguf-q8_0")
RULE_GGUF_TYPES = ("Q8_0", "Q5_K_M", "Q4_K_M")


def _fields(where: str, body: Any, known: dict[str, Any], required: bool = True) -> dict:
    """A mapping with exactly the known keys (all of them when required), each of its expected type."""
    if not isinstance(body, dict):
        raise LowbitError(f"{where}: expected a mapping, got {type(body).__name__}")
    unknown = sorted(str(k) for k in set(body) - set(known))
    if unknown:
        raise LowbitError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}")
    missing = sorted(set(known) - set(body)) if required else []
    if missing:
        raise LowbitError(f"{where}: field(s) {', '.join(missing)} missing")
    for key, typ in known.items():
        if key in body and (not isinstance(body[key], typ) or isinstance(body[key], bool)):
            raise LowbitError(f"{where}: field '{key}' has the wrong type ({type(body[key]).__name__})")
    return body


def _names(where: str, values: list, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise LowbitError(f"{where}: give at least one of {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise LowbitError(f"{where}: '{v}' is unknown; use {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise LowbitError(f"{where}: a value is repeated")
    return tuple(values)


def _text_list(where: str, values: list) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise LowbitError(f"{where}: every entry must be a non-empty string")
    return tuple(values)


def _mapping(where: str, body: Any) -> dict:
    if not isinstance(body, dict):
        raise LowbitError(f"{where}: expected a mapping of names to entries, got {type(body).__name__}")
    return body


def _fragment(where: str, frag: dict) -> dict:
    """A gate spec fragment must parse on its own (an empty one adds nothing)."""
    if frag:
        parse_spec(frag, where)
    return frag


def parse_guide(data: Any, source: str) -> Guide:
    """Check the data file key by key (unknown keys are errors) and build the Guide."""
    _fields(f"guide {source}", data, {k: object for k in TOP_KEYS})
    if data["version"] != GUIDE_VERSION:
        raise LowbitError(f"guide {source}: field 'version' is {data['version']!r}; this lowbit reads {GUIDE_VERSION}")
    recipes = {}
    for name, body in _mapping(f"guide {source}: recipes", data["recipes"]).items():
        if name in PRESETS:
            raise LowbitError(f"guide {source}: recipe '{name}' has a preset's name; give it another")
        recipes[name] = Recipe.from_dict(body, f"guide {source}: recipes.{name}")
    tasks = {}
    for name, body in _mapping(f"guide {source}: tasks", data["tasks"]).items():
        where = f"guide {source}: tasks.{name}"
        _names(f"guide {source}: tasks", [name], TASKS)
        body = _fields(where, body, {"gate": dict, "reason": str})
        tasks[name] = {"gate": _fragment(f"{where}.gate", body["gate"]), "reason": body["reason"]}
    missing = sorted(set(TASKS) - set(tasks))
    if missing:
        raise LowbitError(f"guide {source}: tasks {', '.join(missing)} are not described")
    gguf = {}
    for name, body in _mapping(f"guide {source}: gguf_types", data["gguf_types"]).items():
        _names(f"guide {source}: gguf_types", [name], GGUF_TYPES)
        body = _fields(f"guide {source}: gguf_types.{name}", body, {"bits": (int, float), "note": str})
        if not 1 <= body["bits"] <= 32:
            raise LowbitError(f"guide {source}: gguf_types.{name}: field 'bits' is {body['bits']}; fix: 1 to 32")
        gguf[str(name)] = {"bits": float(body["bits"]), "note": body["note"]}
    for what, have, need in (("recipes", recipes, RULE_RECIPES), ("gguf_types", gguf, RULE_GGUF_TYPES),
                             ("scenarios", data["scenarios"] or {}, SCENARIOS)):
        lack = [n for n in need if n not in have]
        if lack:
            raise LowbitError(f"guide {source}: {what} {', '.join(lack)} missing (the rules use them)")
    gpus = _fields(f"guide {source}: gpus", data["gpus"], {"fp8": list})
    fp8 = tuple(g.lower() for g in _text_list(f"guide {source}: gpus.fp8", gpus["fp8"]))
    guide = Guide({}, recipes, tasks, gguf, fp8)
    for name, body in _mapping(f"guide {source}: scenarios", data["scenarios"]).items():
        where = f"guide {source}: scenario '{name}'"
        body = _fields(where, body, SCENARIO_KEYS)
        headroom = float(body["memory_headroom"])
        if not 0 <= headroom < 1:
            raise LowbitError(f"{where}: field 'memory_headroom' is {headroom}; fix: a share from 0 to below 1")
        if body["kv_cache"] not in ("none", "int8"):
            raise LowbitError(f"{where}: field 'kv_cache' is {body['kv_cache']!r}; the guide recommends none or int8")
        guide.recipe(body["recipe"])  # resolves, or names the choices
        guide.scenarios[name] = Scenario(
            name=name, description=body["description"].strip(),
            priorities=_names(f"{where}: field 'priorities'", body["priorities"], PRIORITIES),
            tasks=_names(f"{where}: field 'tasks'", body["tasks"], TASKS), strategy=" ".join(body["strategy"].split()),
            recipe=body["recipe"], kv_cache=body["kv_cache"], keep=_text_list(f"{where}: field 'keep'", body["keep"]),
            gate=_fragment(f"{where}: field 'gate'", body["gate"]), memory_headroom=headroom,
            reasons=_text_list(f"{where}: field 'reasons'", body["reasons"]))
    return guide


def load_guide(path: str | Path | None = None) -> Guide:
    """The data file next to this module (cached), or another file in the same format."""
    if path is None:
        return _default_guide()
    return parse_guide(read_data_file(path, "guide file", "pass a YAML file in the format of lowbit/scenarios.yaml"),
                       str(path))


@lru_cache(maxsize=1)
def _default_guide() -> Guide:
    return load_guide(GUIDE_FILE)


def scenario_names() -> tuple[str, ...]:
    return tuple(load_guide().scenarios)


# ---- the target --------------------------------------------------------------------------------

def _as_tuple(value: Any) -> tuple[str, ...]:
    """A tuple of names from a tuple, a list, or one comma-separated string ("latency,quality")."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().lower() for v in value.split(",") if v.strip())
    return tuple(str(v).strip().lower() for v in value)


@dataclass(frozen=True)
class Target:
    """What the model has to run on and be good at. Empty priorities/tasks come from the scenario;
    no scenario: one is chosen from the tasks and priorities (and said so)."""

    cpu_isa: str = "auto"  # auto: this machine's CPU; else avx512vnni, avx512, avx2, generic, arm-neon
    gpu: str | None = None  # None / "none": no GPU; else a name such as h100, a100, rtx4090
    memory_gb: float | None = None  # memory for the model: the GPU's with a GPU, else RAM
    runtime: str = "lowbit"  # lowbit, llama.cpp, vllm
    priorities: tuple[str, ...] = ()  # ordered, from latency, memory, quality
    tasks: tuple[str, ...] = ()  # from chat, json, long-context, jargon, code
    model: str | None = None  # a bundled name, a Hugging Face folder, a .gguf file or a lowbit artifact
    scenario: str | None = None  # low-latency-chat, long-context, tool-calling, edge, batch-throughput

    def __post_init__(self) -> None:
        def field_error(name: str, value: Any, allowed: tuple[str, ...]) -> LowbitError:
            return LowbitError(f"target field '{name}': {value!r} is unknown; use one of {', '.join(allowed)}")

        isa = str(self.cpu_isa or "auto").strip().lower()
        if isa not in ISAS:
            raise field_error("cpu_isa", self.cpu_isa, ISAS)
        runtime = str(self.runtime or "lowbit").strip().lower()
        runtime = RUNTIME_ALIASES.get(runtime, runtime)
        if runtime not in RUNTIMES:
            raise field_error("runtime", self.runtime, RUNTIMES)
        priorities, tasks = _as_tuple(self.priorities), _as_tuple(self.tasks)
        for p in priorities:
            if p not in PRIORITIES:
                raise field_error("priorities", p, PRIORITIES)
        if len(set(priorities)) != len(priorities):
            raise LowbitError(f"target field 'priorities': {', '.join(priorities)} repeats a priority; give each once, "
                              f"most important first")
        for t in tasks:
            if t not in TASKS:
                raise field_error("tasks", t, TASKS)
        tasks = tuple(dict.fromkeys(tasks))
        scenario = None if self.scenario in (None, "") else str(self.scenario).strip().lower()
        if scenario is not None and scenario not in scenario_names():
            raise field_error("scenario", self.scenario, scenario_names())
        mem = self.memory_gb
        if mem is not None:
            if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not math.isfinite(mem) or mem <= 0:
                raise LowbitError(f"target field 'memory_gb': {mem!r} is not a size; fix: give the gigabytes available "
                                  f"for the model, a number above 0 (e.g. 8)")
            mem = float(mem)
        gpu = None if self.gpu is None or str(self.gpu).strip().lower() in NO_GPU else str(self.gpu).strip()
        model = None if self.model in (None, "") else str(self.model)
        for name, value in (("cpu_isa", isa), ("runtime", runtime), ("priorities", priorities), ("tasks", tasks),
                            ("scenario", scenario), ("memory_gb", mem), ("gpu", gpu), ("model", model)):
            object.__setattr__(self, name, value)


# ---- the answer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    value: Any
    reason: str


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


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ---- hardware ----------------------------------------------------------------------------------

def detect_isa() -> Decision:
    """This machine's best instruction-set path, from the CPU's flags (no build): /proc/cpuinfo on
    Linux; elsewhere lowbit.native's own detection (which builds its portable C file once)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64") or machine.startswith("armv8"):
        return Decision("arm-neon", f"cpu_isa auto: this machine is {machine} (NEON); lowbit's native kernels run their "
                                    f"portable C path there")
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags:
        avx2 = {"avx2", "fma", "f16c"} <= flags
        avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl"} <= flags
        isa = "avx512vnni" if avx512 and "avx512_vnni" in flags else "avx512" if avx512 else "avx2" if avx2 else "generic"
        said = "from /proc/cpuinfo"
    else:
        from lowbit import native

        found = native.supported_isas()
        isa, said = (found[0] if found else "generic"), "from lowbit.native's CPU check"
    return Decision(isa, f"cpu_isa auto: this machine's CPU reports {isa} ({said})")


def fp8_gpu(gpu: str | None, guide: Guide) -> bool:
    if gpu is None:
        return False
    key = re.sub(r"[\s_\-]", "", gpu.lower()).removeprefix("nvidia").removeprefix("geforce").removeprefix("amd")
    key = key.removeprefix("instinct")
    return any(key.startswith(p) for p in guide.fp8_gpus)


# ---- the model, without loading it -------------------------------------------------------------

class Tensor(NamedTuple):
    name: str  # as a module name recipes match on ("model.layers.0.mlp.down_proj", "lm_head")
    numel: int
    ndim: int
    row: int  # the length of one row (a Linear's in_features); 0 for a 1-D tensor


@dataclass
class ModelInfo:
    name: str
    kind: str
    path: Path
    tensors: list[Tensor] | None  # None: not counted
    counted_from: str
    arch: str | None = None
    file_bytes: int | None = None  # what the model's files hold now (an artifact's or GGUF's own size)
    source_names: tuple[str, ...] = ()  # names a registry run may give this model as its baseline
    source_paths: tuple[str, ...] = ()
    float_model: str | None = None  # the model to quantize from: itself, or for an artifact the one it names

    @property
    def parameters(self) -> int | None:
        return None if self.tensors is None else sum(t.numel for t in self.tensors)


# GGUF tensor names -> the Hugging Face module names recipes match on
_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _hf_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base == "output":
        return "lm_head"
    if base == "token_embd":
        return "model.embed_tokens"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _GGUF_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}"
    return base


def _gguf_table(path: Path) -> tuple[list[Tensor], str | None]:
    """The tensor table and architecture of a GGUF file, read once (the checks of sources.check_gguf,
    on the same reader: the magic bytes, and every tensor inside the file)."""
    from gguf import GGUFReader

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
        reader = GGUFReader(str(path))
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file ({size} bytes)")
        arch = reader.fields.get("general.architecture")
        # GGUF lists dimensions innermost first: shape[0] is the row length
        tensors = [Tensor(_hf_name(t.name), int(t.n_elements), len(t.shape), int(t.shape[0]) if len(t.shape) > 1 else 0)
                   for t in reader.tensors]
        return tensors, (str(arch.contents()) if arch is not None else None)
    except OSError as e:
        raise LowbitError(f"GGUF file {path}: cannot be read ({e.strerror}); check the path and permissions") from None
    except Exception as e:  # the reader raises many types on damaged files
        raise LowbitError(f"GGUF file {path}: is truncated or corrupt ({e}); fix: copy or re-export the file again") from None


def _safetensors_table(files: list[Path]) -> list[Tensor]:
    from lowbit.model.st_reader import read_header

    tensors = []
    for f in files:
        for name, info in read_header(f)[1].items():
            tensors.append(_st_tensor(name, info["shape"]))
    return tensors


def _st_tensor(name: str, shape: list[int]) -> Tensor:
    return Tensor(name.removesuffix(".weight"), math.prod(shape), len(shape), shape[-1] if len(shape) > 1 else 0)


def _config_arch(folder: Path) -> str | None:
    try:
        import json

        cfg = json.loads((folder / "config.json").read_text())
        return (cfg.get("architectures") or [cfg.get("model_type")])[0]
    except (OSError, ValueError, AttributeError, IndexError):
        return None


def inspect_model(model: str) -> ModelInfo:
    """What the model is and how many parameters it holds, from its headers (no weights loaded).
    A path that does not exist is a LowbitError naming it and the fix."""
    from lowbit.model import sources

    src = sources.resolve(model)
    names, paths = (src.name,), (() if src.kind == "bundled" else (str(src.path.resolve()),))
    if src.kind in ("bundled", "gguf"):
        gguf_file = sources.gguf_path(src)
        tensors, arch = _gguf_table(gguf_file)
        return ModelInfo(src.name, src.kind, src.path, tensors, "GGUF tensor table", arch,
                         gguf_file.stat().st_size, names, paths, model)
    if src.kind == "hf":
        files = sources.check_hf_folder(src.path)
        return ModelInfo(src.name, src.kind, src.path, _safetensors_table(files), "safetensors headers",
                         _config_arch(src.path), sum(f.stat().st_size for f in files), names, paths, model)
    if src.kind == "lowbit":
        return _artifact_info(src)
    # compressed-tensors: packed shapes do not give a parameter count; report the files' size only
    files = sources.weight_files(src.path)
    return ModelInfo(src.name, src.kind, src.path, None, "a compressed-tensors checkpoint: packed tensors give no "
                     "parameter count", _config_arch(src.path), sum(f.stat().st_size for f in files), names, paths)


def _artifact_info(src) -> ModelInfo:
    """A lowbit artifact: its linear modules from lowbit.json, everything else from the header."""
    from lowbit.exporters.inspect import artifact_summary
    from lowbit.model.artifact import WEIGHTS_FILE
    from lowbit.model.st_reader import read_header

    summary = artifact_summary(src.path)  # checks lowbit.json, the header and the tensors against it
    modules = {row["name"]: row for row in summary["modules"]}
    header = read_header(src.path / WEIGHTS_FILE)[1]
    tensors = [Tensor(name, row["in_features"] * row["out_features"], 2, row["in_features"])
               for name, row in modules.items() if row["bytes"]]
    tensors += [_st_tensor(k, v["shape"]) for k, v in header.items() if k.rpartition(".")[0] not in modules]
    source = summary.get("source") or {}
    names = tuple(n for n in (source.get("name"), src.name) if n)
    paths = (str(src.path.resolve()),)
    # the float model it came from, as lowbit.json names it: only printed in commands, never opened here
    origin = source.get("name") if source.get("kind") == "bundled" else source.get("path")
    return ModelInfo(src.name, "lowbit", src.path, tensors, "lowbit.json and the artifact's safetensors header",
                     None, summary["weight_bytes"], names, paths, origin if isinstance(origin, str) and origin else None)


# ---- sizes -------------------------------------------------------------------------------------

_DTYPE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


def spec_bits(spec, row: int = 0, group_fallback: str = "shrink") -> float:
    """Bits per weight of a scheme with its scales and zero points, for rows of `row` inputs (0: unknown,
    per-row scales then count as nothing). A group the row length does not divide shrinks to the largest
    power of two that does, as group_fallback "shrink" quantizes it."""
    if spec is None:
        return 16.0
    g = spec.group_size
    while g and row and row % g and group_fallback == "shrink":
        g //= 2  # halved until it divides the row, as the recipe's fallback does
    if spec.kind == "nf4":
        return 4 + (8 / g + 64 / (g * 256) if spec.double_quant else 32 / g)
    scale = 32 if spec.kind.startswith("fp8") else _DTYPE_BITS.get(spec.scale_dtype, 32)
    zero = 0 if spec.symmetric else (8 if spec.zero_domain == "int" else scale)
    per = g if spec.granularity == "group" else (row if spec.granularity == "channel" else 0)
    return spec.bits + ((scale + zero) / per if per else 0.0)


def estimate_bytes(tensors: list[Tensor], recipe: Recipe) -> int:
    """The weight bytes `recipe` would give a model with these tensors. 2-D tensors are Linear weights
    (their recipe scheme), except embeddings: kept in keep_dtype, or, when the head is tied to them
    (no head tensor), the head's quantized rows serve them. 1-D tensors stay in keep_dtype."""
    keep = _DTYPE_BITS[recipe.keep_dtype]
    tied = not any(t.name == "lm_head" for t in tensors)
    head = recipe.spec_for("lm_head")
    bits = 0.0
    for t in tensors:
        if t.ndim < 2:
            b = keep
        elif "embed" in t.name.rsplit(".", 1)[-1] or t.name.endswith("wte"):
            b = spec_bits(head, t.row, recipe.group_fallback) if tied and head is not None else keep
        else:
            b = spec_bits(recipe.spec_for(t.name), t.row, recipe.group_fallback)
        bits += t.numel * b
    return int(bits / 8)


def gguf_bytes(parameters: int, bits: float) -> int:
    return int(parameters * bits / 8)


# ---- rules -------------------------------------------------------------------------------------

def rule_scenario(t: Target, guide: Guide) -> Decision:
    """The named scenario, or the one the tasks and priorities point to."""
    if t.scenario:
        return Decision(t.scenario, f"scenario {t.scenario}: {guide.scenarios[t.scenario].description}")
    if "json" in t.tasks:
        name, why = "tool-calling", "the tasks include JSON / tool calls"
    elif "long-context" in t.tasks:
        name, why = "long-context", "the tasks include long context"
    elif t.priorities[:1] == ("memory",):
        name, why = "edge", "memory comes first"
    else:
        name, why = "low-latency-chat", "no task or priority points elsewhere"
    return Decision(name, f"scenario {name} chosen because {why} (pass --scenario to pick another)")


def rule_priority_start(priorities: tuple[str, ...], sc: Scenario) -> Decision | None:
    """A first priority other than the scenario's own moves the lowbit-runtime starting recipe."""
    first = priorities[0]
    if first == sc.priorities[0] or PRIORITY_START[first] == sc.recipe:
        return None
    name = PRIORITY_START[first]
    why = {"quality": "INT8 weight-only is the closest to the original among the fast CPU formats (see docs/BENCHMARKS.md, presets)",
           "memory": "INT4 in groups of 128 is the smallest preset with a fast CPU kernel",
           "latency": "INT4 weights are the fewest bytes read per decoded token"}[first]
    return Decision(name, f"{first} first (the scenario assumes {sc.priorities[0]} first): start from {name}: {why}")


def rule_cpu_isa(recipe: Recipe, isa: str, priorities: tuple[str, ...]) -> Decision | None:
    """What lowbit's CPU kernels run well on this instruction set."""
    dynamic = recipe.scheme.activation == "int8_dynamic"
    if dynamic and isa != "avx512vnni":
        return Decision("int8", f"the CPU has no VNNI int8 dot products ({isa}): w8a8-dynamic's int8 x int8 GEMM runs "
                                f"with 7-bit activations there and loses quality, so INT8 weight-only (int8) instead; "
                                f"batches still share each weight read")
    four_bit = recipe.scheme.bits <= 4
    if four_bit and isa in ("generic", "arm-neon") and priorities[0] != "memory":
        return Decision("int8", f"on {isa} lowbit runs its portable C kernels, where INT4 decoding measured slower than "
                                f"FP32 and INT8 did not (see docs/BENCHMARKS.md, rows marked [generic]); INT8 instead. "
                                f"On ARM, llama.cpp (--runtime llama.cpp) has NEON kernels for 4-bit types")
    return None


def rule_vllm(t: Target, sc: Scenario, guide: Guide) -> Decision:
    """vLLM reads compressed-tensors: FP8 on GPUs with FP8 tensor cores, else W8A8 INT8 or W4A16 g128."""
    first = t.priorities[0]
    if t.gpu is None:
        gpu_note = "no GPU given: vLLM's quantized kernels are GPU kernels, so a GPU without FP8 is assumed; "
    else:
        gpu_note = ""
    if fp8_gpu(t.gpu, guide) and first != "memory":
        return Decision("fp8", f"{t.gpu} has FP8 tensor cores: FP8 E4M3 weights with a scale per output channel, "
                               f"exported as compressed-tensors (float-quantized), are close to the original at half of FP16's bytes")
    if first == "memory" or (first == "latency" and sc.name != "batch-throughput"):
        return Decision("w4a16-g128-sym", f"{gpu_note}{first} first: W4A16 (INT4 weights, groups of 128, symmetric, "
                                          f"activations float) is vLLM's most widely supported 4-bit form, a quarter of "
                                          f"FP16's weight bytes; decode at small batch is bound by reading them")
    return Decision("w8a8-dynamic", f"{gpu_note}W8A8 (INT8 weights per channel, INT8 activations per token, dynamic) "
                                    f"runs on INT8 tensor cores; it pays off when batches make the products compute-bound")


def rule_llamacpp(priorities: tuple[str, ...]) -> Decision:
    """llama.cpp's GGUF type by priority."""
    first, second = priorities[0], (priorities[1:2] or ("",))[0]
    if first == "quality":
        return Decision("Q8_0", "quality first: Q8_0 (8-bit blocks of 32) is the closest GGUF type to the original")
    if first == "latency" and second == "quality":
        return Decision("Q5_K_M", "latency first, quality next: Q5_K_M, llama.cpp's 5-bit mix, a step above Q4_K_M in "
                                  "quality for about 0.8 more bits per weight")
    return Decision("Q4_K_M", f"{first} first: Q4_K_M, llama.cpp's 4-bit mix with its sensitive tensors in more bits")


def rule_head_int8(recipe: Recipe, tasks: tuple[str, ...]) -> Decision | None:
    """JSON and tool calls are decided at the output head: keep it at 8 bits or more."""
    if "json" not in tasks:
        return None
    head = recipe.spec_for("lm_head")
    if head is None or head.bits >= 8:
        return Decision(recipe, "JSON / tool calls: the output head stays INT8 per row or better (this recipe already "
                                "does), since structure tokens are chosen there")
    return Decision(replace(recipe, overrides=(HEAD_INT8, *recipe.overrides)),
                    "JSON / tool calls: the output head is raised to INT8 per row, since structure tokens are chosen there")


def rule_kv_cache(t: Target, sc: Scenario, runtime: str) -> Decision:
    """The KV cache: never FP8; float for long context unless memory comes first; INT8 to save memory."""
    if "long-context" in t.tasks:
        kv = "int8" if t.priorities[0] == "memory" else "none"
        why = ("long context: KV cache " + ("INT8 (memory first; one scale per token and head)" if kv == "int8" else
               "unquantized") + ", never FP8 (3 mantissa bits in E4M3, 2 in E5M2): at the same bytes INT8 measured far "
               "closer at full context (see docs/BENCHMARKS.md, KV-cache section)")
    elif t.priorities[0] == "memory" and sc.kv_cache == "none":
        kv, why = "int8", "memory first: INT8 KV cache (68 instead of 256 bytes per token and head at head_dim 64)"
    else:
        kv = sc.kv_cache
        why = f"KV cache {kv} (the scenario's choice; INT8 rather than FP8 when quantized: same bytes, less divergence)"
    if runtime == "llama.cpp":
        why += (f"; llama.cpp sets its KV type when it runs: --cache-type-k/--cache-type-v "
                f"{'q8_0' if kv == 'int8' else 'f16'}")
    elif runtime == "vllm":
        why += ("; in vLLM leave --kv-cache-dtype at auto" if kv == "none" else
                "; vLLM's quantized KV cache is FP8 (--kv-cache-dtype fp8), not INT8: measure it there before using it")
    return Decision(kv, why)


def rule_method(recipe: Recipe, t: Target, runtime: str, gguf_type: str | None) -> Decision:
    """Calibrated methods over round-to-nearest where they pay, and only where the scheme allows them."""
    schemes = [recipe.scheme, *(o.scheme for o in recipe.overrides if o.scheme is not None)]
    if any(s.kind != "int" for s in schemes):
        return Decision("rtn", f"{recipe.name}: calibration works on integer schemes only, so round-to-nearest")
    if gguf_type is not None and gguf_type != "Q8_0":
        return Decision("gptq", f"the artifact is an 8-bit starting point for llama.cpp's {gguf_type}: calibrating it "
                                f"(GPTQ) records the importance matrix llama.cpp's K-quants use; its 8-bit weights are "
                                f"dequantized before llama.cpp quantizes them")
    if recipe.scheme.activation == "int8_dynamic":
        return Decision("smoothquant", "W8A8: SmoothQuant moves activation outliers into the weights before rounding "
                                       "(it cut W8A8's divergence in the measured runs, see docs/BENCHMARKS.md)")
    if min(s.bits for s in schemes) <= 4:
        if runtime == "vllm":
            return Decision("awq", "4-bit for vLLM: AWQ (its scales are folded into the weights, so the export is exact; "
                                   "GPTQ's act-order permutation is re-rounded to nearest on compressed-tensors export)")
        if t.priorities[0] == "quality" or "json" in t.tasks:
            why = "quality first" if t.priorities[0] == "quality" else "JSON output"
            return Decision("awq", f"4-bit with {why}: a calibrated method, AWQ (activation-aware scales); GPTQ did "
                                   f"better on another model in the measured runs, so try --method gptq too "
                                   f"(see docs/BENCHMARKS.md, calibrated tables)")
        return Decision("gptq", "4-bit: a calibrated method, GPTQ, instead of round-to-nearest (it cut divergence in the "
                                "measured runs, see docs/BENCHMARKS.md, calibrated tables)")
    return Decision("rtn", "8-bit weights: round-to-nearest is already close to the original (see docs/BENCHMARKS.md, "
                           "presets); calibration would add time for little")


def rule_memory_fit(info: ModelInfo | None, memory_gb: float | None, headroom: float,
                    candidates: list[tuple[str, int]], start: str) -> tuple[Decision, dict | None]:
    """Walk from the starting candidate down to the first whose estimated weights fit the budget.
    candidates: (name, estimated bytes), best quality first. Decision.value: (name, fits)."""
    if memory_gb is None:
        return Decision((start, True), "no memory given: sizes are not checked"), None
    if info is None or info.parameters is None:
        why = "no model given" if info is None else f"the parameter count of {info.name} was not read ({info.counted_from})"
        return Decision((start, True), f"memory {memory_gb:g} GB given but {why}: sizes are not estimated; the tune "
                                       f"command's --max-size keeps the weights within the budget"), None
    budget = memory_gb * 1e9 * (1 - headroom)
    rows = [{"name": n, "bytes": b, "bits_per_weight": 8 * b / info.parameters, "fits": b <= budget}
            for n, b in candidates]
    table = {"parameters": info.parameters, "counted_from": info.counted_from, "memory_bytes": memory_gb * 1e9,
             "headroom": headroom, "budget_bytes": budget, "candidates": rows}
    names = [r["name"] for r in rows]
    for row in rows[names.index(start):]:
        if row["fits"]:
            if row["name"] == start:
                return Decision((start, True), f"{start} fits: about {_gb(row['bytes'])} of weights against "
                                               f"{_gb(budget)} ({headroom:.0%} of {memory_gb:g} GB kept free for the "
                                               f"KV cache, activations and the runtime)"), table
            return Decision((row["name"], True), f"{start} does not fit (about {_gb(rows[names.index(start)]['bytes'])} "
                                                 f"against {_gb(budget)}): {row['name']} instead, about "
                                                 f"{_gb(row['bytes'])}"), table
    smallest = min(rows, key=lambda r: r["bytes"])
    return Decision((smallest["name"], False),
                    f"nothing fits: the smallest candidate, {smallest['name']}, needs about {_gb(smallest['bytes'])} "
                    f"of weights against a budget of {_gb(budget)} ({headroom:.0%} of {memory_gb:g} GB kept free); "
                    f"give more memory or pick a smaller model"), table


def rule_tune_bits(recipe: Recipe, priorities: tuple[str, ...], gguf_type: str | None, guide: Guide) -> Decision | None:
    """Say so when the tune command's --max-bits is below the starting point's bits per weight."""
    bits = guide.gguf_types[gguf_type]["bits"] if gguf_type else spec_bits(recipe.scheme)
    limit = MAX_BITS[priorities[0]]
    if bits <= limit:
        return None
    return Decision(limit, f"the tune command searches mixes of at most {limit} bits per weight ({priorities[0]} first), "
                           f"below this starting point's ~{bits:.1f}: it looks for a smaller mix that still passes the "
                           f"gate; raise --max-bits to {math.ceil(bits)} to keep the starting point among the choices")


def rule_tune_method(recipe: Recipe, method: str, runtime: str) -> Decision:
    """The method the tune command runs. lowbit tune searches weight-only integer mixes below the starting
    point, where calibration pays; for an export (GGUF, compressed-tensors) AWQ, which leaves no column
    permutation: GPTQ's act-order permutation is re-rounded to nearest when exported."""
    schemes = [recipe.scheme, *(o.scheme for o in recipe.overrides if o.scheme is not None)]
    buildable = all(s.kind == "int" and s.activation == "none" for s in schemes)
    if runtime in ("vllm", "llama.cpp"):
        tm, why = "awq", (f"AWQ, which leaves no column permutation, so the {runtime} export writes what was gated "
                          f"(GPTQ's act-order permutation is re-rounded to nearest on export)")
    elif method in TUNE_METHODS and method != "rtn":
        tm, why = method, method
    else:
        tm, why = "gptq", "GPTQ (below 8 bits calibration pays)"
    if buildable:
        return Decision(tm, f"the tune command searches per-module mixes under the gate spec with {why}")
    return Decision(tm, f"lowbit tune searches weight-only integer mixes (docs/tune.md), so it cannot build "
                        f"{recipe.name} ({recipe.scheme.label}): the quantize command makes that starting point, and "
                        f"the tune command looks for a weight-only mix that passes the same gate, with {why}")


# ---- the gate spec -----------------------------------------------------------------------------

def _stricter(section: str, key: str, old: Any, new: Any) -> Any:
    """When two sources set one criterion, the stricter threshold stays; eval/bench settings: the later."""
    if section in ("eval", "bench") or not all(isinstance(v, (int, float)) for v in (old, new)):
        return new
    return min(old, new) if key.startswith("max_") else max(old, new)


def merge_spec(base: dict, fragment: dict, section: str = "") -> dict:
    out = dict(base)
    for key, val in fragment.items():
        where = section or key
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = merge_spec(out[key], val, where)
        elif key in out and not isinstance(val, dict):
            out[key] = _stricter(where, key, out[key], val)
        else:
            out[key] = val
    return out


def build_spec(fragments: list[tuple[str, dict]], runtime: str) -> tuple[str, list[str]]:
    """lowbit's default gate with the fragments merged in, as YAML text that parse_spec accepts."""
    data = yaml.safe_load(DEFAULT_SPEC)
    for _, frag in fragments:
        data = merge_spec(data, frag)
    notes = []
    if runtime != "lowbit" and ("latency" in data or "bench" in data):
        data.pop("latency", None)
        data.pop("bench", None)
        notes.append(f"the spec has no latency section: lowbit bench times lowbit's own CPU runtime, not {runtime}; "
                     f"measure speed in {runtime} itself")
    parse_spec(data, "recommended spec")
    head = ["# Gate spec written by `lowbit recommend`: lowbit's default gate (lowbit/eval/gate.py)",
            "# plus " + ", ".join(name for name, _ in fragments) + "; where two set one criterion the stricter stays.",
            "# Format: docs/gate.md. Edit the thresholds to your needs."]
    text = "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return text, notes


# ---- measured numbers --------------------------------------------------------------------------

def _same_model(run: dict, info: ModelInfo) -> bool:
    base, cand = run.get("baseline") or {}, run.get("candidate") or {}
    if info.kind == "lowbit" and cand.get("path") and str(Path(cand["path"]).resolve()) in info.source_paths:
        return True
    if base.get("name") not in info.source_names:
        return False
    if info.kind == "bundled":
        return base.get("kind") == "bundled"
    if base.get("path") and str(Path(base["path"]).resolve()) in info.source_paths:
        return True
    # a GGUF baseline is recorded with its converted folder as path: compare the file's sha256 instead
    return info.kind == "gguf" and base.get("kind") == "gguf" and base.get("sha256") == _gguf_sha(info)


def _gguf_sha(info: ModelInfo) -> str | None:
    from lowbit.model.sources import sha256_memo

    try:
        return sha256_memo([info.path])
    except OSError:
        return None


def measured_runs(info: ModelInfo, db: Path | None = None, limit: int = 200) -> list[dict]:
    """The registry's runs of this model (newest first), as the rows the recommendation lists."""
    from lowbit.report.registry import get_run, list_runs

    rows = []
    for row in list_runs(limit=limit, kind=None, db=db):
        if row["baseline"] not in info.source_names and not (info.kind == "lowbit" and row["candidate"] == info.name):
            continue
        run = get_run(row["id"], db=db)["run"]
        if not _same_model(run, info):
            continue
        cand, base = run.get("candidate") or {}, run.get("baseline") or {}
        wb = cand.get("weight_bytes")
        params = info.parameters
        rows.append({"run_id": row["id"], "kind": row["kind"], "created": row["created"], "candidate": row["candidate"],
                     "recipe": row["recipe"], "weight_bytes": wb,
                     "size_vs_baseline": wb / base["weight_bytes"] if wb and base.get("weight_bytes") else None,
                     "bits_per_weight": 8 * wb / params if wb and params else None,
                     "mean_kld": row["mean_kld"], "ppl_change_pct": row["ppl_change_pct"], "top1": row["top1"],
                     "gate_passed": row["gate_passed"], "decode_speedup": row["decode_tok_s_ratio"]})
    return rows


# ---- the guide ---------------------------------------------------------------------------------

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
