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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.datafile import MAX_PATTERN_CHARS, read_data_file, regex_search, user_regex
from lowbit.errors import LowbitError
from lowbit.formats.spec import QuantSpec

RECIPE_VERSION = 1
ALGORITHMS = ("rtn", "rtn-mse", "gptq", "awq", "awq-gptq", "smoothquant", "learned")  # all but rtn need calibration (lowbit.calib)
GROUP_FALLBACKS = ("error", "shrink")
KEEP_DTYPES = ("float16", "bfloat16", "float32")
KV_CACHES = ("none", "int8", "fp8")
MAX_PATTERNS = 1000  # targets + ignore + overrides of one recipe


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
    # where the recipe came from ("recipe file x.yaml"), for errors raised while matching; not saved
    source: str = field(default="recipe", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version != RECIPE_VERSION:
            raise LowbitError(f"recipe field 'version': {self.version} is not supported; this lowbit reads version {RECIPE_VERSION}")
        if self.algorithm not in ALGORITHMS:
            raise LowbitError(f"recipe field 'algorithm': '{self.algorithm}' is not available; use one of {', '.join(ALGORITHMS)}")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise LowbitError(f"recipe field 'group_fallback': '{self.group_fallback}' is unknown; use 'error' or 'shrink'")
        if self.keep_dtype not in KEEP_DTYPES:
            raise LowbitError(f"recipe field 'keep_dtype': '{self.keep_dtype}' is unknown; use one of {', '.join(KEEP_DTYPES)}")
        if self.kv_cache not in KV_CACHES:
            raise LowbitError(f"recipe field 'kv_cache': '{self.kv_cache}' is unknown; use one of {', '.join(KV_CACHES)}")
        if len(self.targets) + len(self.ignore) + len(self.overrides) > MAX_PATTERNS:
            raise LowbitError(f"recipe fields 'targets', 'ignore' and 'overrides': more than {MAX_PATTERNS} patterns "
                              f"together; fix: merge them (a regex 're:a|b' matches either)")
        for key, pat in self._patterns():
            _check_pattern(pat, f"recipe field '{key}'")

    def _patterns(self):
        """(field, pattern) for every module pattern: ('targets[0]', '*'), ('overrides[1].match', ...)."""
        yield from ((f"targets[{i}]", p) for i, p in enumerate(self.targets))
        yield from ((f"ignore[{i}]", p) for i, p in enumerate(self.ignore))
        yield from ((f"overrides[{i}].match", o.match) for i, o in enumerate(self.overrides))

    # -- matching -------------------------------------------------------------------------------
    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The spec this recipe gives a Linear module, or None to keep it in high precision."""
        def hit(key: str, pattern: str) -> bool:
            return matches(pattern, module_name, f"{self.source}: field '{key}'")

        if not any(hit(f"targets[{i}]", p) for i, p in enumerate(self.targets)):
            return None
        if any(hit(f"ignore[{i}]", p) for i, p in enumerate(self.ignore)):
            return None
        for i, o in enumerate(self.overrides):
            if hit(f"overrides[{i}].match", o.match):
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
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise LowbitError(f"{source}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}")
        if "scheme" not in data:
            raise LowbitError(f"{source}: field 'scheme' is missing; add e.g. scheme: {{kind: int, bits: 4, granularity: group, group_size: 128}}")
        kw: dict[str, Any] = {"scheme": QuantSpec.from_dict(data["scheme"], f"{source}: field 'scheme'")}
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise LowbitError(f"{source}: field 'version' must be an integer, got {version!r}; fix: version: {RECIPE_VERSION}")
        for key in ("name", "description", "algorithm", "group_fallback", "keep_dtype", "kv_cache"):
            if key in data and not isinstance(data[key], str):
                raise LowbitError(f"{source}: field '{key}' must be a string, got {data[key]!r}"
                                  f"{' (quote it in YAML)' if data[key] is not None else ''}")
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
            extra = sorted(str(k) for k in set(o) - {"match", "scheme"})
            if extra:
                raise LowbitError(f"{where}: unknown field(s) {', '.join(extra)}; an override has only 'match' and 'scheme'")
            scheme = o.get("scheme")
            parsed.append(Override(o["match"], None if scheme is None else QuantSpec.from_dict(scheme, f"{where}.scheme")))
        kw["overrides"] = tuple(parsed)
        kw["source"] = source
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


def _check_pattern(pat: str, where: str = "recipe") -> None:
    if not isinstance(pat, str) or not pat:
        raise LowbitError(f"{where}: module pattern {pat!r} must be a non-empty string")
    if pat.startswith("re:"):
        user_regex(pat[3:], where, fix="fix it or use a glob")
    elif len(pat) > MAX_PATTERN_CHARS:
        raise LowbitError(f"{where}: module pattern is {len(pat):,} characters, over the limit of "
                          f"{MAX_PATTERN_CHARS:,}; fix: shorten it")


def matches(pattern: str, name: str, where: str = "recipe pattern") -> bool:
    """Glob on the full module name, or a regex (searched) when the pattern starts with 're:'.

    A regex runs with the `regex` package under a timeout (lowbit.datafile.REGEX_TIMEOUT_S); one that
    takes longer is a LowbitError naming `where` (the file and field) and the pattern."""
    if pattern.startswith("re:"):
        return regex_search(pattern[3:], name, where)
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

