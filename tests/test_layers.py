"""kernel/ shows its layers (docs/ARCHITECTURE.md, "Layers"): imports point one way.

``kernel/hw`` (the emulated hardware and hypervisor) imports nothing of the OS; the OS
(``kernel/core``) uses the hardware and never the offline tools; the tools
(``kernel/tools``) and applications (``kernel/apps``) may use both; nothing in kernel/
imports the harness or the schemes. Read from the source with ``ast``, lazy imports
inside functions included.
"""

import ast
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parent.parent / "kernel"
ALLOWED = {  # a layer's modules may import these layers of kernel/
    "hw": {"hw", "param"},
    "core": {"hw", "core", "param"},
    "tools": {"hw", "core", "tools", "param"},
    "apps": {"hw", "core", "apps", "param"},
}
FOREIGN = ("harness", "systems", "tests")


def imported(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from … import`` in the file names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            if node.module == "kernel":
                out |= {f"kernel.{a.name}" for a in node.names}
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "kernel" or len(parts) < 2:
        return None
    return parts[1]


def modules():
    return sorted(p for p in KERNEL.rglob("*.py") if p.parent != KERNEL)


def test_every_kernel_module_lives_in_a_layer():
    loose = sorted(p.name for p in KERNEL.glob("*.py") if p.name not in ("__init__.py", "param.py"))
    assert loose == [], f"modules outside a layer of kernel/: {loose}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(KERNEL)))
def test_imports_point_one_way(path):
    layer = path.relative_to(KERNEL).parts[0]
    names = imported(path)
    wrong = sorted(n for n in names if layer_of(n) not in (None, *ALLOWED[layer]))
    foreign = sorted(n for n in names if n.split(".")[0] in FOREIGN)
    assert not wrong, f"kernel/{layer} may not import {wrong}"
    assert not foreign, f"kernel/ may not import the harness or the schemes: {foreign}"
