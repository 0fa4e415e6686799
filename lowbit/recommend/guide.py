"""The decision guide's data file (lowbit/scenarios.yaml): Scenario and Guide, checked key by key when
loaded (parse_guide, load_guide), and the priority, task and GGUF type names it may use."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lowbit.datafile import read_data_file
from lowbit.errors import LowbitError
from lowbit.eval.gate import parse_spec
from lowbit.exporters.gguf_types import LLAMA_CPP_TYPES, PY_TYPES
from lowbit.recipe import PRESETS, Recipe

GUIDE_FILE = Path(__file__).parent.with_name("scenarios.yaml")  # lowbit/scenarios.yaml
GUIDE_VERSION = 1
GGUF_TYPES = (*PY_TYPES, *LLAMA_CPP_TYPES)  # what `lowbit export --format gguf --type` writes
PRIORITIES = ("latency", "memory", "quality")
TASKS = ("chat", "json", "long-context", "jargon", "code")


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
