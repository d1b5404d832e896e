"""The layering rule of docs/architecture.md, checked on the source: every import inside the package goes down the
layers (or stays inside its own module or subpackage), nothing but the CLI imports the CLI, and no module imports
another module's private names. Lazy imports inside functions count: a hidden upward arrow is still an arrow."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from support import ROOT

SRC = ROOT / "src" / "e5v"

#: lowest first; a unit may import units of lower layers only (docs/architecture.md draws the same picture)
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config", "prompts", "parts", "images", "readers", "tiny"),
    ("adapters", "items"),
    ("backbones",),
    ("prepare", "batching", "workers"),
    ("encoder", "vectors"),
    ("store", "eval", "train", "serve", "bench"),
    ("toyworld",),
    ("cli",),
]
LEVEL = {unit: n for n, units in enumerate(LAYERS) for unit in units}


def unit_of(parts: tuple[str, ...]) -> str:
    """The unit of a module inside the package: its subpackage, or the module itself at the top level."""
    return parts[0]


def imports(path: Path):
    """(line, imported module as a tuple of names inside e5v, imported names) of every e5v import in ``path``."""
    package = path.relative_to(SRC).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = (*base, *(node.module.split(".") if node.module else ()))
            elif node.module and node.module.split(".")[0] == "e5v":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            names = [a.name for a in node.names]
            if not target:  # `from . import x` at the top: x is the unit
                for name in names:
                    yield node.lineno, (name,), []
            else:
                yield node.lineno, target, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "e5v" and len(a.name.split(".")) > 1:
                    yield node.lineno, tuple(a.name.split(".")[1:]), []


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(p.relative_to(SRC).with_suffix("").parts) for p in SOURCES} - {"__init__"}
    assert units <= set(LEVEL), f"units without a layer in LAYERS: {sorted(units - set(LEVEL))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_the_layers(path):
    rel = path.relative_to(SRC).with_suffix("").parts
    if rel == ("__init__",):
        return  # the package's front door re-exports the public API
    here = unit_of(rel)
    upward = []
    for line, target, _ in imports(path):
        there = unit_of(target)
        if there != here and LEVEL.get(there, -1) >= LEVEL[here]:
            upward.append(f"line {line}: {here} (layer {LEVEL[here]}) imports {'.'.join(target)} "
                          f"(layer {LEVEL.get(there)})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_another_modules_private_names(path):
    private = [f"line {line}: {name} from {'.'.join(target)}" for line, target, names in imports(path)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: an engine module that imports the store is reported."""
    fake = tmp_path / "e5v"
    (fake / "store").mkdir(parents=True)
    (fake / "encoder.py").write_text("def f():\n    from .store import open_index\n")
    (fake / "store" / "__init__.py").write_text("from ..encoder import E5V\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    with pytest.raises(AssertionError, match="encoder .* imports store"):
        test_imports_go_down_the_layers(fake / "encoder.py")
    test_imports_go_down_the_layers(fake / "store" / "__init__.py")  # downward: fine
