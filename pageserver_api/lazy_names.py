"""Names a module re-exports from others, each imported on its first use (PEP 562's module
`__getattr__`): importing a package or module for one name then costs that name's module
only (pageserver_api.models' API models, the snapfile package's reader and writer)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def load_name(namespace: dict[str, Any], module_of: Mapping[str, str], name: str) -> Any:
    """`name` from its module (`module_of`), kept in `namespace` (the re-exporting module's
    globals) so it is looked up there from then on; AttributeError if it is not one."""
    module = module_of.get(name)
    if module is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value
