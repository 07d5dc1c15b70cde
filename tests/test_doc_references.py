"""Modules cite what a reader of this repository can open: PostgreSQL's source files, or the
facts themselves, never notes that live outside it (shared/reference/*.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "pageserver", "pageserver_api", "pg15", "proto", "snapfile", "walreceiver")
OUTSIDE_NOTES = re.compile(r"shared/reference|pg15-wal\.md|datadir-at-lsn\.md|cli-rfc\.md")


def test_no_module_cites_notes_outside_the_repository() -> None:
    sources = [
        path
        for top in (*PACKAGES, "tests", "bench")
        if (ROOT / top).is_dir()
        for path in (ROOT / top).rglob("*")
        if path.suffix in (".py", ".pyi", ".c") and path.is_file()
    ]
    assert len(sources) > 100
    this = Path(__file__).resolve()
    cited = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sources
        if path.resolve() != this
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_NOTES.search(line)
    ]
    assert cited == []
