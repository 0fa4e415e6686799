"""Recipe: what to quantize, how, and what to keep in higher precision. Frozen and versioned.

A recipe is data (YAML or JSON), never code:

    version: 1
    name: my-w4
    scheme: {kind: int, bits: 4, granularity: group, group_size: 128, symmetric: false, scale_dtype: float16}
    algorithm: rtn
    targets: ["*"]                   # Linear modules to consider (glob, or "re:<regex>")
    ignore: ["lm_head"]              # never quantized; kept in keep_dtype
    overrides:                       # first match wins; scheme: null keeps the module in keep_dtype
      - {match: "*.down_proj", scheme: {kind: int, bits: 8, granularity: channel}}
    group_fallback: shrink           # rows the group size does not divide: "error" or "shrink"
    keep_dtype: float16              # storage dtype of everything not quantized (embeddings, norms, head)
    kv_cache: none                   # KV-cache format the artifact runs with: none, int8, fp8
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lowbit.datafile import read_data_file
from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec

RECIPE_VERSION = 1
ALGORITHMS = ("rtn", "rtn-mse", "gptq", "awq", "awq-gptq", "smoothquant")  # all but rtn need calibration (lowbit.calib)
GROUP_FALLBACKS = ("error", "shrink")
KEEP_DTYPES = ("float16", "bfloat16", "float32")
KV_CACHES = ("none", "int8", "fp8")


@dataclass(frozen=True)
class Override:
    match: str
    scheme: QuantSpec | None  # None: keep this module in keep_dtype


@dataclass(frozen=True)
class Recipe:
    scheme: QuantSpec
    name: str = "custom"
    algorithm: str = "rtn"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()
    group_fallback: str = "error"
    keep_dtype: str = "float16"
    kv_cache: str = "none"
    description: str = ""
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise LowbitError(f"recipe field 'version': {self.version} is not supported; this lowbit reads version {RECIPE_VERSION}")
        if self.algorithm not in ALGORITHMS:
            raise LowbitError(f"recipe field 'algorithm': '{self.algorithm}' is not available; use one of {', '.join(ALGORITHMS)}")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise LowbitError(f"recipe field 'group_fallback': '{self.group_fallback}' is unknown; use 'error' or 'shrink'")
        if self.keep_dtype not in KEEP_DTYPES:
            raise LowbitError(f"recipe field 'keep_dtype': '{self.keep_dtype}' is unknown; use one of {', '.join(KEEP_DTYPES)}")
        if self.kv_cache not in KV_CACHES:
            raise LowbitError(f"recipe field 'kv_cache': '{self.kv_cache}' is unknown; use one of {', '.join(KV_CACHES)}")
        for pat in (*self.targets, *self.ignore, *(o.match for o in self.overrides)):
            _check_pattern(pat)

    # -- matching -------------------------------------------------------------------------------
    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The spec this recipe gives a Linear module, or None to keep it in high precision."""
        if not any(matches(p, module_name) for p in self.targets):
            return None
        if any(matches(p, module_name) for p in self.ignore):
            return None
        for o in self.overrides:
            if matches(o.match, module_name):
                return o.scheme
        return self.scheme

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "scheme": self.scheme.to_dict(),
            "algorithm": self.algorithm,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "overrides": [{"match": o.match, "scheme": None if o.scheme is None else o.scheme.to_dict()} for o in self.overrides],
            "group_fallback": self.group_fallback,
            "keep_dtype": self.keep_dtype,
            "kv_cache": self.kv_cache,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise LowbitError(f"{source}: a recipe is a mapping with at least a 'scheme' field, got {type(data).__name__}")
        known = {"version", "name", "description", "scheme", "algorithm", "targets", "ignore", "overrides",
                 "group_fallback", "keep_dtype", "kv_cache"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LowbitError(f"{source}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}")
        if "scheme" not in data:
            raise LowbitError(f"{source}: field 'scheme' is missing; add e.g. scheme: {{kind: int, bits: 4, granularity: group, group_size: 128}}")
        kw: dict[str, Any] = {"scheme": QuantSpec.from_dict(data["scheme"], f"{source}: field 'scheme'")}
        for key in ("version", "name", "description", "algorithm", "group_fallback", "keep_dtype", "kv_cache"):
            if key in data:
                kw[key] = data[key]
        for key in ("targets", "ignore"):
            if key in data:
                val = data[key]
                if isinstance(val, str):
                    val = [val]
                if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                    raise LowbitError(f"{source}: field '{key}' must be a list of module-name patterns (strings)")
                kw[key] = tuple(val)
        overrides = data.get("overrides") or []
        if not isinstance(overrides, list):
            raise LowbitError(f"{source}: field 'overrides' must be a list of {{match: PATTERN, scheme: ...}} entries")
        parsed = []
        for i, o in enumerate(overrides):
            where = f"{source}: overrides[{i}]"
            if not isinstance(o, dict) or "match" not in o or not isinstance(o["match"], str):
                raise LowbitError(f"{where}: each override needs a 'match' pattern (string) and a 'scheme' (a mapping, or null to keep the module unquantized)")
            extra = sorted(set(o) - {"match", "scheme"})
            if extra:
                raise LowbitError(f"{where}: unknown field(s) {', '.join(extra)}; an override has only 'match' and 'scheme'")
            scheme = o.get("scheme")
            parsed.append(Override(o["match"], None if scheme is None else QuantSpec.from_dict(scheme, f"{where}.scheme")))
        kw["overrides"] = tuple(parsed)
        try:
            return cls(**kw)
        except LowbitError as e:
            raise LowbitError(f"{source}: {e}") from None
        except TypeError as e:
            raise LowbitError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        data = read_data_file(path, "recipe file", "check the path, or name a preset (see `lowbit presets`)")
        return cls.from_dict(data, f"recipe file {Path(path)}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_pattern(pat: str) -> None:
    if not isinstance(pat, str) or not pat:
        raise LowbitError(f"recipe: module pattern {pat!r} must be a non-empty string")
    if pat.startswith("re:"):
        try:
            re.compile(pat[3:])
        except re.error as e:
            raise LowbitError(f"recipe: pattern '{pat}' is not a valid regular expression ({e}); fix it or use a glob") from None


def matches(pattern: str, name: str) -> bool:
    """Glob on the full module name, or a regex (searched) when the pattern starts with 're:'."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


# -- presets ------------------------------------------------------------------------------------
def _int(bits: int, granularity: str, group_size: int | None = None, symmetric: bool = True,
         scale_dtype: str = "float32", activation: str = "none") -> QuantSpec:
    return QuantSpec(kind="int", bits=bits, granularity=granularity, group_size=group_size,
                     symmetric=symmetric, scale_dtype=scale_dtype, activation=activation)


# The output head of every preset is INT8 per row (rather than FP8: the same bytes, and less perplexity
# lost): at 135M-270M parameters the head is a fifth to three fifths of the model, so a float head would
# dominate both the bytes a decoded token reads and, for tied models, memory (its rows also serve as the
# embedding table).
HEAD_INT8 = Override("lm_head", _int(8, "channel"))

PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="int8", scheme=_int(8, "channel"), ignore=(),
               description="INT8 weights, symmetric, one scale per output channel; activations stay float"),
        Recipe(name="w8a8-dynamic", scheme=_int(8, "channel", activation="int8_dynamic"), ignore=(), overrides=(HEAD_INT8,),
               description="dynamic INT8: INT8 per-channel weights, activations quantized per token at run time (head: INT8 weight-only)"),
        Recipe(name="w4-g128", scheme=_int(4, "group", 128, symmetric=False, scale_dtype="float16"), group_fallback="shrink",
               ignore=(), overrides=(HEAD_INT8,),
               description="INT4 asymmetric, groups of 128 (rows 128 does not divide use the largest power-of-two group that does); head INT8"),
        Recipe(name="w4-g128-m", scheme=_int(4, "group", 128, symmetric=False, scale_dtype="float16"), group_fallback="shrink",
               ignore=(), overrides=(HEAD_INT8, Override("*.v_proj", _int(8, "channel")), Override("*.down_proj", _int(8, "channel"))),
               description="INT4 asymmetric g128, with the value and down projections in INT8 per channel (the layers "
                           "llama.cpp's _M mixes also give more bits); head INT8"),
        Recipe(name="w4-g32", scheme=_int(4, "group", 32, symmetric=False, scale_dtype="float16"), group_fallback="shrink",
               ignore=(), overrides=(HEAD_INT8,), description="INT4 asymmetric, groups of 32; head INT8"),
        Recipe(name="nf4", scheme=QuantSpec(kind="nf4", bits=4, granularity="group", group_size=64, double_quant=True),
               group_fallback="shrink", ignore=(), overrides=(HEAD_INT8,),
               description="NF4 (QLoRA NormalFloat-4), absmax groups of 64, double-quantized scales; head INT8"),
        Recipe(name="fp8", scheme=QuantSpec(kind="fp8_e4m3", bits=8, granularity="channel"), ignore=(), overrides=(HEAD_INT8,),
               description="FP8 E4M3 weights with one float32 scale per output channel; head INT8"),
        Recipe(name="fp8-e5m2", scheme=QuantSpec(kind="fp8_e5m2", bits=8, granularity="channel"), ignore=(), overrides=(HEAD_INT8,),
               description="FP8 E5M2 weights with one float32 scale per output channel (wider range, fewer mantissa bits); head INT8"),
    )
}


def preset(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise LowbitError(f"unknown preset '{name}'; available presets: {', '.join(PRESETS)} (or pass a recipe file, .yaml or .json)") from None


def resolve_recipe(recipe: "Recipe | str | Path") -> Recipe:
    """A Recipe, a preset name, or the path of a YAML/JSON recipe file."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith((".yaml", ".yml", ".json")) or Path(text).exists():
        return Recipe.from_file(text)
    return preset(text)

