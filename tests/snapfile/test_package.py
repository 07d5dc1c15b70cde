"""The `snapfile` package's lazily loaded names (snapfile/__init__.py)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import snapfile


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the `if TYPE_CHECKING:` imports of the package's __init__."""
    tree = ast.parse(Path(snapfile.__file__).read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                found.update((alias.name, imp.module) for alias in imp.names)
    return found


def test_every_name_comes_from_its_module() -> None:
    assert _type_checking_imports() == snapfile._MODULE_OF
    for name, module in snapfile._MODULE_OF.items():
        assert getattr(snapfile, name) is getattr(importlib.import_module(module), name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = snapfile.Nothing  # type: ignore[attr-defined]


def test_the_delta_module_loads_no_reader_writer_or_manifest() -> None:
    """`pg checkout`'s applier imports snapfile.delta: the package's other modules are not
    its cost to pay."""
    code = (
        "import sys, snapfile.delta; "
        "print(sorted(m for m in sys.modules if m.startswith('snapfile')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['snapfile', 'snapfile.delta']"
