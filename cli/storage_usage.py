"""What each snapshot and PITR area of a native storage keeps, for `storage show`/`list`
(definitions: pageserver/history/usage.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.context import App
from cli.nodes import HISTORY_DIR
from cli.output import human_size, print_table
from cli.pageserver_control import local_api
from cli.registry import StorageRow
from pageserver_api.models import StorageUsageRequest


def retained_json(app: App, row: StorageRow) -> list[dict[str, Any]] | None:
    """Referenced and exclusive bytes per snapshot and PITR area, largest exclusive first;
    None for a storage that holds no page history (only native ones do)."""
    if row.type != "native":
        return None
    root = Path(row.options["path"]) / HISTORY_DIR  # as cli.nodes.history_dir names it
    if not root.is_dir():
        return []
    found = local_api(app).storage_usage(StorageUsageRequest(str(root)))
    found.sort(key=lambda r: (-r.exclusive_bytes, r.kind, r.name))
    return [r.to_wire() for r in found]


def print_retained(retained: list[dict[str, Any]]) -> None:
    """The text form: a table under `storage show`."""
    if not retained:
        return
    click.echo("  kept by (EXCLUSIVE: freed by `neon pitr gc` if it alone were destroyed;")
    click.echo("  REFERENCED: what it reads through or spans, shared bytes in each):")
    print_table(
        ("    KIND", "NAME", "EXCLUSIVE", "OF WHICH WAL", "REFERENCED"),
        [
            (
                f"    {r['kind']}",
                r["name"],
                human_size(r["exclusive_bytes"]),
                human_size(r["exclusive_wal_bytes"]) if r["kind"] != "snapshot" else "-",
                human_size(r["referenced_bytes"]),
            )
            for r in retained
        ],
    )
