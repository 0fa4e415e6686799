"""The decision guide behind `lowbit recommend`: from a target (hardware, runtime, priorities, tasks,
optionally a model) to a strategy, a starting recipe, a gate spec, the numbers measured here, and the
`lowbit tune` command to run next.

    from lowbit.recommend import Target, recommend, write_spec
    rec = recommend(Target(runtime="llama.cpp", scenario="tool-calling", model="smollm2-135m", memory_gb=1))
    print(rec.to_markdown())
    write_spec(rec, "spec.yaml")          # the gate spec the tune command names

The scenarios, the extra recipes the rules use, the GGUF types and the FP8 GPUs are data
(lowbit/scenarios.yaml), checked key by key when loaded. The rules are small `rule_*` functions; each
returns a Decision (the value and the reason in words), and every reason ends up in
Recommendation.reasons, in the order the rules ran. Nothing here loads a model's weights: sizes come
from safetensors headers, GGUF tensor tables or lowbit.json, and measured numbers only from the run
registry (lowbit.report.registry); a number that was not measured here is never shown as if it was.

Modules: guide (the data file), target (Target), modelinfo (the model from its headers; sizes), rules
(Decision, the rules, hardware checks), gate_spec, measured (registry runs), core (Recommendation,
recommend, write_spec, write_recipe). The public names are re-exported here; the rest live in their modules.
"""

from __future__ import annotations

from lowbit.recommend.core import Recommendation, recommend, write_recipe, write_spec, NO_MEASUREMENTS
from lowbit.recommend.gate_spec import build_spec, merge_spec
from lowbit.recommend.guide import GUIDE_FILE, Guide, Scenario, load_guide, parse_guide, scenario_names
from lowbit.recommend.measured import measured_runs
from lowbit.recommend.modelinfo import ModelInfo, Tensor, estimate_bytes, gguf_bytes, inspect_model, spec_bits
from lowbit.recommend.rules import Decision, detect_isa
from lowbit.recommend.target import ISAS, RUNTIMES, Target

__all__ = ["GUIDE_FILE", "ISAS", "NO_MEASUREMENTS", "RUNTIMES", "Decision", "Guide", "ModelInfo", "Recommendation",
           "Scenario", "Target", "Tensor", "build_spec", "detect_isa", "estimate_bytes", "gguf_bytes", "inspect_model",
           "load_guide", "measured_runs", "merge_spec", "parse_guide", "recommend", "scenario_names", "spec_bits",
           "write_recipe", "write_spec"]
