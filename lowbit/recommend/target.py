"""Target: what the model has to run on and be good at, checked and normalised when built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.recommend.guide import PRIORITIES, TASKS, scenario_names

ISAS = ("auto", "avx512vnni", "avx512", "avx2", "generic", "arm-neon")
RUNTIMES = ("lowbit", "llama.cpp", "vllm")
RUNTIME_ALIASES = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp"}
NO_GPU = ("", "none", "cpu", "no")


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
