"""The pageserver daemon's side imports nothing of the CLI's (cli/), at a module's top or
on use in a function: what both sides run lives beside them (datadir_files/: the unpacker,
since the daemon writes a local basebackup itself; snapfile/verified.py: a `.neon` file's
verified tar, which the daemon's import of a whole file reads). The CLI may import theirs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAEMON_SIDE = (
    "pageserver", "pageserver_api", "walreceiver", "proto", "snapfile", "datadir_files",
    "durable_files", "pg15",
)  # fmt: skip


def cli_imports(path: Path) -> list[str]:
    """The `cli` modules `path` imports anywhere in it, as `line: module`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [f"{node.lineno}: {n}" for n in names if n == "cli" or n.startswith("cli.")]
    return found


def test_the_daemon_side_imports_nothing_of_the_clis() -> None:
    """Failed on the tree before datadir_files/ (local_files, proto_service and import_neon
    imported cli.untar on use, import_neon cli.snapshot_file_source)."""
    found = {
        str(path.relative_to(ROOT)): imports
        for package in DAEMON_SIDE
        for path in sorted((ROOT / package).rglob("*.py"))
        if (imports := cli_imports(path))
    }
    assert found == {}
