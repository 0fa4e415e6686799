"""docs/ARCHITECTURE.md's layer list, checked against every import in the package.

Each module may import modules of its own unit (its subpackage, or itself) and of units in lower
layers; never a unit in its own layer or above. Function-level imports count the same as
module-level ones (they only defer the cost, not the dependency). Private names (one leading
underscore) are not imported across units.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowbit"


def layers_from_doc() -> dict[str, int]:
    """unit -> layer number, from the 'Layers' block of docs/ARCHITECTURE.md (lines 'L<n>  unit unit ...')."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("<!-- layers -->")[1]
    table = {}
    for m in re.finditer(r"^L(\d+)\s+(.+)$", block, re.M):
        for unit in re.findall(r"lowbit(?:\.[a-z_]+)?", m.group(2)):
            table[unit] = int(m.group(1))
    return table


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(name: str, table: dict[str, int]) -> str | None:
    parts = name.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in table:
            return ".".join(parts[:n])
    return None


def imports(source: str, module: str, is_package: bool):
    """(line, imported module, names) for every import statement, at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if target == "lowbit":  # `from lowbit import native` names a unit; `from lowbit import X` the root
                for n in names:
                    yield node.lineno, f"lowbit.{n}" if f"lowbit.{n}" in layers_from_doc() else "lowbit", [n]
            else:
                yield node.lineno, target, names


def violations(source: str, module: str, table: dict[str, int], is_package: bool = False) -> list[str]:
    unit = unit_of(module, table)
    assert unit is not None, f"{module} is in no layer of docs/ARCHITECTURE.md"
    found = []
    for line, target, names in imports(source, module, is_package):
        if not (target == "lowbit" or target.startswith("lowbit.")):
            continue
        tu = unit_of(target, table)
        if tu is None:
            found.append(f"{module}:{line} imports {target}, which is in no layer")
            continue
        if tu == unit:
            continue
        if table[tu] >= table[unit]:
            found.append(f"{module}:{line} imports {target} (L{table[tu]}) from L{table[unit]}")
        found += [f"{module}:{line} imports private {target}.{n}" for n in names
                  if n.startswith("_") and not n.startswith("__")]
    return found


def test_every_import_points_down_a_layer():
    table = layers_from_doc()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path.read_text(), module_name(path), table, path.name == "__init__.py")
    assert not found, "imports that break docs/ARCHITECTURE.md's layers:\n" + "\n".join(found)


def test_every_unit_in_the_package_has_a_layer():
    table = layers_from_doc()
    units = {module_name(p) for p in PACKAGE.glob("*.py")} | {module_name(p) for p in PACKAGE.glob("*/__init__.py")}
    assert units - {"lowbit"} <= set(table), sorted(units - set(table) - {"lowbit"})


def test_the_checker_catches_an_upward_a_sideways_and_a_private_import():
    table = layers_from_doc()
    up = "def f():\n    from lowbit.eval import run\n"
    sideways = "from lowbit.benchmark.latency import BenchConfig\n"
    private = "from lowbit.model.skeleton import _libc_trim\n"
    assert violations(up, "lowbit.model.load", table)
    assert violations(sideways, "lowbit.eval.run", table)
    assert any("private" in v for v in violations(private, "lowbit.calib.sequential", table))
    assert not violations("from lowbit.formats import affine\nfrom .load import load_model\n", "lowbit.model.x", table)
