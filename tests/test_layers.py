"""Imports go downward only: the lower layers (what runs a model's layers) never import the layers above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "verispec"
ABOVE_BACKENDS = ("verispec.api", "verispec.bench", "verispec.models", "verispec.cli", "verispec.experiments",
                  "verispec.registry", "verispec.drafters", "verispec.engine", "verispec.datastore")
# module (file under src/verispec) -> the verispec modules it must not import, directly or inside a function
RULES = {
    "home.py": ("verispec.",),
    "kernels": ("verispec.backends", "verispec.rewrites", *ABOVE_BACKENDS),
    "rewrites": ("verispec.backends", "verispec.kernels", *ABOVE_BACKENDS),
    "backends": ABOVE_BACKENDS,
    "allocator.py": ("verispec.",),
    "datastore_cli.py": ("verispec.cli",),
    "registry.py": ("verispec.api", "verispec.bench", "verispec.cli"),  # read by all of them
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("where", list(RULES))
def test_lower_layers_do_not_import_upward(where):
    files = [SRC / where] if where.endswith(".py") else sorted((SRC / where).glob("*.py"))
    assert files and all(f.exists() for f in files)
    for f in files:
        bad = sorted(m for m in imports(f) for forbidden in RULES[where] if m.startswith(forbidden))
        assert not bad, f"{f.relative_to(SRC)} imports {bad}"
