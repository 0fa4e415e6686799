"""QuantSpec: what one tensor's quantized format is. Frozen, versioned, validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lowbit.errors import LowbitError

SPEC_VERSION = 1

KINDS = ("int", "nf4", "fp8_e4m3", "fp8_e5m2")
GRANULARITIES = ("tensor", "channel", "group")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
# "none": weight-only. "int8_dynamic": activations quantized per token at run time.
# "int8_static": one calibrated activation scale per module (stored as `input_scale`).
ACTIVATIONS = ("none", "int8_dynamic", "int8_static")
# Asymmetric int only. "int": an integer zero point z, x = s * (q - z) (the textbook form).
# "float": a float offset m, x = s * q + m (GGUF Q4_1, HQQ, torchao's float zero-point domain).
ZERO_DOMAINS = ("int", "float")


@dataclass(frozen=True)
class QuantSpec:
    """The storage format of one weight tensor.

    kind:        "int" (affine integer), "nf4" (QLoRA NormalFloat-4), "fp8_e4m3", "fp8_e5m2".
    bits:        2..8 for "int"; 4 for "nf4"; 8 for fp8.
    granularity: "tensor" (one scale), "channel" (one per output row), "group" (one per
                 `group_size` consecutive inputs of a row).
    symmetric:   int only. True: q = round(x/s), zero point 0. False: q = round(x/s) + z.
    double_quant: nf4 only. Quantize the per-group absmax scales to int8 (QLoRA).
    scale_dtype: dtype the scales are stored in.
    activation:  "none", "int8_dynamic" (per-token int8 activations, int8 x int8 matmul) or
                 "int8_static" (one calibrated per-tensor activation scale, `input_scale`).
    zero_domain: asymmetric int only. "int" stores an integer zero point (x = s*(q - z)); "float"
                 stores a float offset in scale_dtype (x = s*q + m, m = the group minimum), which
                 reproduces GGUF Q4_1 grids exactly.
    """

    kind: str = "int"
    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    double_quant: bool = False
    scale_dtype: str = "float32"
    activation: str = "none"
    zero_domain: str = "int"
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(field: str, msg: str) -> LowbitError:
            return LowbitError(f"quantization scheme field '{field}': {msg}")

        if self.version != SPEC_VERSION:
            raise bad("version", f"{self.version} is not supported (this lowbit reads version {SPEC_VERSION})")
        if self.kind not in KINDS:
            raise bad("kind", f"'{self.kind}' is unknown; use one of {', '.join(KINDS)}")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"'{self.granularity}' is unknown; use one of {', '.join(GRANULARITIES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise bad("scale_dtype", f"'{self.scale_dtype}' is unknown; use one of {', '.join(SCALE_DTYPES)}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"'{self.activation}' is unknown; use one of {', '.join(ACTIVATIONS)}")
        if self.zero_domain not in ZERO_DOMAINS:
            raise bad("zero_domain", f"'{self.zero_domain}' is unknown; use one of {', '.join(ZERO_DOMAINS)}")
        if self.zero_domain == "float" and (self.kind != "int" or self.symmetric):
            raise bad("zero_domain", "a float zero point is defined for asymmetric integer formats only; "
                                     "set symmetric: false or remove zero_domain")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise bad("bits", f"must be an integer, got {self.bits!r}")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise bad("bits", f"{self.bits} is out of range; integer formats take 2 to 8 bits")
        if self.kind == "nf4" and self.bits != 4:
            raise bad("bits", "nf4 is a 4-bit format; set bits: 4")
        if self.kind.startswith("fp8") and self.bits != 8:
            raise bad("bits", "fp8 formats are 8-bit; set bits: 8")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise bad("group_size", f"granularity 'group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise bad("group_size", f"only granularity 'group' takes a group_size (granularity is '{self.granularity}')")
        if self.kind == "nf4" and self.granularity != "group":
            raise bad("granularity", "nf4 scales are per group (absmax blocks); set granularity: group, group_size: 64")
        if self.double_quant and self.kind != "nf4":
            raise bad("double_quant", "double quantization of scales is defined for nf4 only")
        if self.kind != "int" and not self.symmetric:
            raise bad("symmetric", f"{self.kind} is symmetric by construction; remove 'symmetric: false'")
        if self.activation != "none" and not (self.kind == "int" and self.bits == 8 and self.symmetric):
            raise bad("activation", f"{self.activation} activations need symmetric 8-bit integer weights (kind: int, bits: 8, symmetric: true)")
        if self.activation != "none" and self.granularity == "group":
            raise bad("activation", f"{self.activation} needs per-channel or per-tensor weight scales; set granularity: channel")

    @property
    def label(self) -> str:
        """Short human label, e.g. 'int4 asym g128', 'nf4 g64 dq', 'int8 ch a8dyn'."""
        if self.kind == "int":
            name = f"int{self.bits}" + ("" if self.symmetric else " asym" if self.zero_domain == "int" else " asym-f")
        else:
            name = self.kind
        gran = {"tensor": "tensor", "channel": "ch", "group": f"g{self.group_size}"}[self.granularity]
        extra = (" dq" if self.double_quant else "") + {"none": "", "int8_dynamic": " a8dyn", "int8_static": " a8static"}[self.activation]
        return f"{name} {gran}{extra}"

    def with_group_size(self, group_size: int) -> "QuantSpec":
        return replace(self, group_size=group_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "scheme") -> "QuantSpec":
        if not isinstance(data, dict):
            raise LowbitError(f"{where}: expected a mapping of fields (kind, bits, granularity, ...), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise LowbitError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}")
        for key, val in data.items():  # JSON types first: "symmetric": "false" is a string, not false
            kind = _FIELD_TYPES[key]
            if kind is bool and not isinstance(val, bool):
                raise LowbitError(f"{where}: field '{key}' must be true or false, got {val!r}"
                                  f"{' (a string: remove the quotes)' if isinstance(val, str) else ''}")
            if kind is int and (not isinstance(val, int) or isinstance(val, bool)) and not (key == "group_size" and val is None):
                raise LowbitError(f"{where}: field '{key}' must be an integer, got {val!r}")
            if kind is str and not isinstance(val, str):
                raise LowbitError(f"{where}: field '{key}' must be a string, got {val!r}")
        try:
            return cls(**data)
        except LowbitError as e:
            raise LowbitError(f"{where}: {e}") from None
        except TypeError as e:  # wrong value types that dataclass rejects
            raise LowbitError(f"{where}: {e}") from None


# The JSON type of each field, checked by from_dict before the dataclass sees the value (group_size may also be null).
_FIELD_TYPES = {"kind": str, "bits": int, "granularity": str, "group_size": int, "symmetric": bool, "double_quant": bool,
                "scale_dtype": str, "activation": str, "zero_domain": str, "version": int}
assert set(_FIELD_TYPES) == {f.name for f in fields(QuantSpec)}
