"""The optional C fast path of native redo (`pageserver/redo/_redo.c`), or None.

The Python redo modules are the reference; the C module redoes the hot Heap, Heap2 and Btree
records (and uncompressed full-page images) and hands everything else back to them. It is
built by `pip install` when a C compiler is present; set NEON_PURE_PYTHON=1 to run without
it (tests compare the two, and fail when it is missing unless NEON_PURE_PYTHON=1 or
NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

from types import ModuleType

from pg15.native import load_extension
from pg15.records import BlockImage, BlockRef, DecodedRecord


class NativeLayoutError(RuntimeError):
    """The C module reads record fields by position and they have moved: rebuild it."""


def _check_layout(module: ModuleType) -> None:
    """The C code reads the NamedTuples by position: refuse to load if a field moved."""
    for cls in (DecodedRecord, BlockRef, BlockImage):
        for name, index in module.RECORD_FIELDS[cls.__name__].items():
            if cls._fields[index] != name:
                raise NativeLayoutError(
                    f"pageserver.redo._redo reads {cls.__name__}.{name} at position {index}, "
                    f"where the class has {cls._fields[index]}: rebuild the C extension "
                    "(`make setup`) after changing pg15/records.py"
                )


def _load() -> ModuleType | None:
    module = load_extension("pageserver.redo._redo")
    if module is not None:
        _check_layout(module)
    return module


redo = _load()
