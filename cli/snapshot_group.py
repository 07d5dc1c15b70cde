"""The `neon snapshot` group: every subcommand loads on use (cli/lazy_group.py), so a command
imports its own module only. `snapshot push`, timed against a full push (issue 12), imported
cli/snapshot_commands.py with the node machinery behind `create`, `import` and `start` (cli.nodes,
cli.extract, the REST control: 40-80 ms of its start) when the group lived there."""

from __future__ import annotations

import click

from cli.lazy_group import LazyGroup

_COMMANDS = "cli.snapshot_commands"

LAZY_SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "create": (
        _COMMANDS,
        "snapshot_create",
        "Name the node's current state (O(1): nothing is copied).",
    ),
    "import": (
        _COMMANDS,
        "snapshot_import",
        "Import an existing PostgreSQL 15 database as snapshot NAME, on a history of its own.",
    ),
    "list": (
        _COMMANDS,
        "snapshot_list",
        "List snapshots; SIZE is the page history a snapshot keeps (for a snapshot of a bucket, "
        "what reading it downloads).",
    ),
    "destroy": (
        _COMMANDS,
        "snapshot_destroy",
        "Forget a snapshot (GC may then drop the history only it kept).",
    ),
    "start": (
        _COMMANDS,
        "snapshot_start",
        "Start a temporary read-only PostgreSQL over a snapshot; prints its connection string.",
    ),
    "stop": (
        _COMMANDS,
        "snapshot_stop",
        "Stop the read-only server over a snapshot and delete its directory.",
    ),
    "diff": (
        "cli.snapshot_diff",
        "snapshot_diff",
        "Show what changed from snapshot A to snapshot B (A may be older or newer).",
    ),
    "export": (
        "cli.snapshot_export",
        "snapshot_export",
        "Export a snapshot: a .neon file, a basebackup tar, a pg_dump -Fc dump, or CSV files.",
    ),
    "pull": (
        "cli.snapshot_transfer",
        "snapshot_pull",
        "Fetch a .neon file from URL as snapshot NAME (default: the file's name).",
    ),
    "push": (
        "cli.snapshot_transfer",
        "snapshot_push",
        "Send a snapshot's .neon file to URL (a directory gets SNAPSHOT.neon): a delta on the "
        "newest snapshot of its history the destination has, unless --full.",
    ),
    "recv": (
        "cli.snapshot_recv",
        "snapshot_recv",
        "Receive pushed snapshots (prints the URL to push to).",
    ),
    "serve": (
        "cli.snapshot_recv",
        "snapshot_serve",
        "Serve this home's snapshots on neon:// (pull, list, push; a token for all).",
    ),
}
"""tests/cli/test_lazy_imports.py checks that each short help is the command's own."""


@click.group("snapshot", cls=LazyGroup, lazy=LAZY_SUBCOMMANDS)
def snapshot_group() -> None:
    """Snapshots: cheap named states of a node (PGDATA@TAG), and imported databases (NAME)."""
