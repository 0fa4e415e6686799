"""The formats the tuner may give a module, and what each costs in bytes.

Each option is a QuantSpec (or None: kept in float16). The menu spans INT8 per channel down to INT3;
the g32 entries are shaped as GGUF's legacy blocks (Q8_0 is not here: per-channel INT8 is smaller
and has lowbit's fast kernel), so a mix made only of them exports to GGUF block for block.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats.qtensor import stored_layout
from lowbit.formats.spec import QuantSpec
from lowbit.model.quantize import fit_group_size


def _int(bits: int, gran: str, group: int | None = None, sym: bool = True, zero: str = "int") -> QuantSpec:
    return QuantSpec(kind="int", bits=bits, granularity=gran, group_size=group, symmetric=sym,
                     scale_dtype="float16", zero_domain=zero)


@dataclass(frozen=True)
class Option:
    key: str  # short stable name, used in measurement files and reports
    spec: QuantSpec | None  # None: keep the module in float16
    gguf: str | None = None  # the GGUF block type this format is, bit for bit, when it is one

    @property
    def label(self) -> str:
        return "float16" if self.spec is None else self.spec.label


MENU: tuple[Option, ...] = (
    Option("f16", None, "F16"),
    Option("int8-ch", _int(8, "channel")),
    Option("int5-g32-asym", _int(5, "group", 32, False, "float"), "Q5_1"),
    Option("int5-g32", _int(5, "group", 32), "Q5_0"),
    Option("int4-g32-asym", _int(4, "group", 32, False, "float"), "Q4_1"),
    Option("int4-g32", _int(4, "group", 32), "Q4_0"),
    Option("int4-g64-asym", _int(4, "group", 64, False)),
    Option("int4-g128-asym", _int(4, "group", 128, False)),
    Option("int3-g64-asym", _int(3, "group", 64, False)),
    Option("int3-g128-asym", _int(3, "group", 128, False)),
)
BY_KEY = {o.key: o for o in MENU}
# the head of every lowbit preset: INT8 per row (its rows also serve as a tied model's embedding table)
HEAD = _int(8, "channel")


def option(key: str, where: str = "menu") -> Option:
    try:
        return BY_KEY[key]
    except KeyError:
        raise LowbitError(f"{where}: format '{key}' is not in the tuner's menu; use one of {', '.join(BY_KEY)}") from None


def parse_menu(text: str | None) -> tuple[Option, ...]:
    """A comma list of option keys ('int8-ch,int4-g32'), or None for the whole menu."""
    if not text:
        return MENU
    keys = [k.strip() for k in text.split(",") if k.strip()]
    opts = tuple(option(k, "--menu") for k in keys)
    if not any(o.spec is not None for o in opts):
        raise LowbitError("--menu: name at least one quantized format (float16 alone quantizes nothing)")
    return opts


def fitted(spec: QuantSpec | None, in_features: int, module: str) -> QuantSpec | None:
    """The spec a module really gets: groups the row length does not divide shrink, as the presets do."""
    if spec is None:
        return None
    return fit_group_size(spec, in_features, "shrink", module)[0]


def spec_bytes(spec: QuantSpec | None, rows: int, cols: int) -> int:
    """Bytes the artifact stores for a (rows, cols) weight in this format (float16 when spec is None)."""
    if spec is None:
        return 2 * rows * cols
    need, _ = stored_layout(spec, rows, cols)
    total = 0
    for shape, dtype in need.values():
        n = 1
        for s in shape:
            n *= s
        total += n * dtype.itemsize
    return total

# Only GGUF block types (Q8_0 as INT8 g32, which lowbit runs without a fast kernel): a mix of these
# exports to GGUF block for block, so llama.cpp runs exactly the tuned weights.
GGUF_MENU: tuple[Option, ...] = (
    Option("int8-g32", _int(8, "group", 32), "Q8_0"),
    *(o for o in MENU if o.gguf),
)
BY_KEY.update({o.key: o for o in GGUF_MENU})
