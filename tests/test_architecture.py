"""The package's layers as ARCHITECTURE.md states them: every module of dinosae/ is in its layer
table, and every import of a dinosae module (at the top of a file or inside a function) points
to the same layer or a lower one. The basics layer is torch-free."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinosae"
ENTRY = {"dinosae", "dinosae.__main__"}  # the package's own __init__/__main__: entry points


def layer_table() -> dict[str, tuple[int, bool]]:
    """ARCHITECTURE.md's table: module or package name -> (layer number, may import torch)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    layers = {}
    for m in re.finditer(r"^\| (\d)\. [^|]+\| ([^|]+)\| (yes|no) \|$", text, re.M):
        for name in re.findall(r"`([\w/]+)`", m[2]):
            layers["dinosae." + name.rstrip("/")] = (int(m[1]), m[3] == "yes")
    return layers


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str, table: dict) -> tuple[int, bool] | None:
    """The table's entry for a module: its own, or its package's (dinosae.models.dit -> models)."""
    while name:
        if name in table:
            return table[name]
        name = name.rpartition(".")[0]
    return None


def imports(path: Path, known: set[str], me: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import in the file (module `me`, by default its own name),
    `from dinosae import rfm` read as dinosae.rfm; relative imports resolved."""
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def test_every_module_is_in_the_layer_table():
    table, mods = layer_table(), modules()
    assert len({layer for layer, _ in table.values()}) == 6, table
    missing = [m for m in mods if m not in ENTRY and layer_of(m, table) is None]
    assert not missing, f"modules ARCHITECTURE.md's layer table does not place: {missing}"
    stale = [m for m in table if m not in mods]
    assert not stale, f"ARCHITECTURE.md names modules that do not exist: {stale}"


def test_imports_point_down_and_the_basics_are_torch_free():
    table, mods = layer_table(), modules()
    wrong = []
    for name, path in mods.items():
        if name in ENTRY:
            continue
        mine, torch_ok = layer_of(name, table)
        for line, target in imports(path, set(mods)):
            if not torch_ok and target.split(".")[0] == "torch":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports torch in a torch-free layer")
            if target.split(".")[0] != "dinosae" or target in ENTRY:
                continue
            theirs = layer_of(target, table)
            if theirs is not None and theirs[0] > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} (layer {mine}) imports {target} "
                             f"(layer {theirs[0]})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_upward_imports_inside_functions_and_relative_ones(tmp_path):
    table, known = layer_table(), set(modules())
    fake = tmp_path / "dit.py"
    fake.write_text("import torch\n\n\ndef f():\n    from dinosae.train import loop\n"
                    "    from ..generate import sample_to_h5\n    from . import keymap\n")
    found = [t for _, t in imports(fake, known, me="dinosae.models.dit")]
    assert found == ["torch", "dinosae.train.loop", "dinosae.generate", "dinosae.models.keymap"]
    assert [layer_of(t, table)[0] for t in found[1:]] == [5, 5, 3]
    assert layer_of("dinosae.models.dit", table)[0] == 3
