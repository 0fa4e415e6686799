"""The rules: small functions that each return a Decision (the value and the reason in words), and
the hardware checks they use (detect_isa, fp8_gpu)."""

from __future__ import annotations

import math
import platform
import re
from dataclasses import dataclass, replace
from typing import Any

from lowbit.recipe import HEAD_INT8, Recipe
from lowbit.recommend.guide import Guide, Scenario
from lowbit.recommend.modelinfo import ModelInfo, _gb, spec_bits
from lowbit.recommend.target import Target

# the methods `lowbit tune --method` takes (docs/tune.md; it searches weight-only integer mixes)
TUNE_METHODS = ("rtn", "rtn-mse", "gptq", "awq", "awq-gptq")
# --max-bits of the tune command, by the first priority
MAX_BITS = {"memory": 4.5, "latency": 4.5, "quality": 6.0}
# the recipe each first priority starts from when it is not the scenario's own first priority
PRIORITY_START = {"quality": "int8", "memory": "w4-g128", "latency": "w4-g128"}


@dataclass(frozen=True)
class Decision:
    value: Any
    reason: str


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
