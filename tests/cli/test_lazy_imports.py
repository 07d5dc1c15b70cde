"""The CLI's start-up: a command imports its own modules, not the heavy machinery of others.

Every `neon` invocation pays for what it imports before doing anything: `snapshot create`
right after a load and `pg checkout` are timed against PostgreSQL's own tools (issue 10), and
an incremental push against a full one (issue 12). The subcommands of `neon snapshot` and
`neon pg` that live in modules of their own load on use (cli/lazy_group.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cli.lazy_group import SHORT_HELP_LIMIT, LazyGroup, load_command
from cli.pg_commands import pg_group
from cli.snapshot_group import snapshot_group
from pg15.native import walscan
from tests.neoncli import NEON, NeonCli

HEAVY = (
    "walreceiver",  # the WAL receiver and base backup client: attach, import
    "aiobotocore",
    "botocore",  # s3 transfers
    "aiohttp",  # http transfers, the console
    "psycopg",  # a tenth of a second; psql does a node's few queries
    "pageserver.redo",
    "cli.transport",  # push and pull
    "cli.snapshot_import",
    "cli.snapshot_transfer",
    "cli.attach",
    "cli.rest_commands",
    "tqdm",  # only a terminal shows a bar
    # its import reads package metadata (13-21 ms); pg15/checksum.py takes it only without the
    # C module (NEON_PURE_PYTHON=1, or not built), where a CRC has no other way
    *(() if walscan is None else ("crc32c",)),
    "pg15.records",  # the WAL record decoders (pg_control needs only pg15/checkpoint.py)
    "pg15.rmgr",
)
"""Modules (and their submodules) that `neon --help`, `snapshot create` and `pg checkout`
must not import."""


def imported(stderr: str) -> set[str]:
    """The modules a run with PYTHONPROFILEIMPORTTIME=1 imported (`-X importtime` lines)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"package"}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_imported_parses_importtime_lines() -> None:
    """The check below must see what it looks for: a real `-X importtime` of a heavy module."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import cli.attach"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "cli.attach" in heavy(imported(proc.stderr))
    assert "walreceiver.receiver" in heavy(imported(proc.stderr))


@pytest.mark.parametrize("group", [snapshot_group, pg_group], ids=["snapshot", "pg"])
def test_lazy_short_help_is_the_commands_own(group: LazyGroup) -> None:
    assert group.lazy
    for name, entry in group.lazy.items():
        assert entry[2] == load_command(entry).get_short_help_str(SHORT_HELP_LIMIT), name


@pytest.mark.parametrize("group", [snapshot_group, pg_group], ids=["snapshot", "pg"])
def test_group_help_lists_every_command(group: LazyGroup) -> None:
    ctx = click.Context(group, info_name=group.name)
    text = " ".join(group.get_help(ctx).split())
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        assert f"{name} {' '.join(command.get_short_help_str(SHORT_HELP_LIMIT).split())}" in text


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["snapshot", "--help"], ["snapshot", "create", "--help"], ["pg", "--help"]],
    ids=" ".join,
)
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([NEON, *argv], capture_output=True, text=True, env=env, check=True)
    assert heavy(imported(proc.stderr)) == []


def test_snapshot_create_and_checkout_import_nothing_heavy(neon: NeonCli) -> None:
    """The real commands on a real node (their function-level imports included)."""
    neon.run("pg", "create")
    neon.run("snapshot", "create", "pgdata1@before")
    profiled = NeonCli(neon.home, {"PYTHONPROFILEIMPORTTIME": "1"})
    create = profiled.run("snapshot", "create", "pgdata1@s1")
    # The profile is there (a module importlib.import_module loads has no line of its own).
    assert "cli.nodes" in imported(create.stderr)
    assert heavy(imported(create.stderr)) == []
    checkout = profiled.run("pg", "checkout", "pgdata1@before")
    assert "cli.checkout" in imported(checkout.stderr)
    # On the import-ahead thread (importlib.import_module's own module has no line: its imports do)
    assert "cli.delta_apply" in imported(checkout.stderr)
    assert heavy(imported(checkout.stderr)) == []


DELTA_MACHINERY = ("cli.checkout_delta", "cli.delta_apply", "snapfile")
"""What only an in-place checkout (and snapshot transfer) uses: the delta applier and the
`.neon` delta reader (50-70 ms of a command's start)."""


def test_start_and_stop_import_no_delta_machinery(neon: NeonCli) -> None:
    """`pg stop`/`pg start` load cli/checkout.py (a start finishes a killed checkout) but only
    its state files' names (cli/checkout_files.py), not the machinery that applies a delta."""
    neon.run("pg", "create")
    profiled = NeonCli(neon.home, {"PYTHONPROFILEIMPORTTIME": "1"})
    for command in ("stop", "start"):
        modules = imported(profiled.run("pg", command, "pgdata1").stderr)
        assert {"cli.checkout", "cli.checkout_files"} <= modules, command
        loaded = [
            m for m in modules if any(m == d or m.startswith(d + ".") for d in DELTA_MACHINERY)
        ]
        assert loaded == [], command


def test_checkout_imports_its_delta_machinery_ahead() -> None:
    """cli/checkout.py leaves cli/checkout_delta.py to a thread started before PostgreSQL is
    stopped (`_import_ahead`), which the command joins before importing anything itself."""
    code = (
        "import sys, threading, cli.checkout\n"
        "before = 'cli.checkout_delta' in sys.modules\n"
        "thread = cli.checkout._import_ahead()\n"
        "assert thread is not threading.current_thread()\n"
        "thread.join()\n"
        "print(before, 'cli.checkout_delta' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "True"]


LAZY_MODEL_AREAS = (
    "pageserver_api.models_pitr",
    "pageserver_api.models_remote",
    "pageserver_api.models_diff",
    "pageserver_api.models_reads",
)
"""API model areas `snapshot create` and `pg checkout` never use (pageserver_api/models.py:
each area's dataclasses cost their creation, a third of a millisecond each, on every start)."""


def test_snapshot_create_and_checkout_create_only_the_models_they_use() -> None:
    """Their modules' imports leave the other areas' models uncreated (an area module that
    importlib loads has no `-X importtime` line: sys.modules is read instead)."""
    code = (
        "import sys, cli.main, cli.pg_commands, cli.checkout, cli.snapshot_commands\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pageserver_api.'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(proc.stdout.split())
    assert {"pageserver_api.models_nodes", "pageserver_api.models_snapshots"} <= loaded
    assert loaded.isdisjoint(LAZY_MODEL_AREAS), sorted(loaded)


def test_a_neon_file_is_taken_in_without_the_replication_client() -> None:
    """`snapshot pull`/`import` of a `.neon` file and `recv` import cli/snapshot_import.py
    (its work directories) but never talk to a server: the BASE_BACKUP client (walreceiver,
    scramp, asn1crypto: 50-130 ms of a command's start) loads only for a server's backup."""
    code = (
        "import cli.main, cli.snapshot_commands, cli.snapshot_import, cli.snapshot_recv, "
        "cli.receiver, cli.neon_file_import"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    modules = imported(proc.stderr)
    assert {"cli.snapshot_import", "cli.receiver", "cli.neon_file_import"} <= modules
    assert sorted(m for m in modules if m.split(".")[0] in ("walreceiver", "scramp")) == []


NODE_MACHINERY = ("cli.nodes", "cli.extract", "cli.rest", "cli.snapshot_commands", "cli.node_lock")
"""What `create`, `import` and `start` need (the node's lifecycle, the REST control, its
basebackup download) and a push does not: 40-80 ms of its start, where the whole delta push
of a 1% change is a few hundred (issue 12: cli/snapshot_group.py)."""


def test_push_imports_no_node_machinery(neon: NeonCli, tmp_path: Path) -> None:
    """A real push to a directory (a whole file, then a delta on it) imports the transfer
    modules and none of the node machinery or the other schemes' clients."""
    neon.run("pg", "create")
    neon.run("snapshot", "create", "pgdata1@s1")
    neon.run("snapshot", "create", "pgdata1@s2")
    profiled = NeonCli(neon.home, {"PYTHONPROFILEIMPORTTIME": "1"})
    for snap in ("pgdata1@s1", "pgdata1@s2"):
        push = profiled.run("snapshot", "push", "--to", f"{tmp_path}/", snap)
        modules = imported(push.stderr)
        # (a module importlib.import_module loads has no line of its own: its imports do)
        assert {"cli.transport.blocking", "cli.transport.file"} <= modules, snap
        loaded = [
            m for m in modules if any(m == n or m.startswith(n + ".") for n in NODE_MACHINERY)
        ]
        assert loaded == [], snap
        clients = (
            "aiobotocore",
            "botocore",
            "aiohttp",
            "walreceiver",
            "psycopg",
            "pageserver.redo",
            "cli.transport.s3",  # the other schemes' transports and the pull's spool
            "cli.transport.neon",
            "cli.transport.spool",
            "datadir_files.untar",  # a pull's or import's unpacking (cli/snapshot_file_source.py)
            "cli.live_import",
            "pageserver.remote",  # PITR areas' remote storage (proto.client has tls_context)
            "pageserver.storage.retention",  # a storage's size options (decimal, fractions)
        )
        assert [m for m in modules if m.split(".")[0] in clients or m.startswith(clients)] == []
    assert "incremental on pgdata1@s1" in push.stdout


def test_push_creates_only_the_models_it_sends() -> None:
    """The push's modules create the snapshot models that read (show, list, the basebackup
    and its plan), not those that create, destroy, import or branch (models_snapshot_writes:
    ~0.6 ms of the start each, and an incremental push is timed against a full one)."""
    code = (
        "import sys, cli.main, cli.snapshot_group, cli.snapshot_transfer\n"
        "from pageserver_api.models import WireModel\n"
        "print(' '.join(sorted(name for m, module in list(sys.modules.items())\n"
        "    if m.startswith('pageserver_api.models_') for name, value in vars(module).items()\n"
        "    if isinstance(value, type) and issubclass(value, WireModel)\n"
        "    and value.__module__ == m)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    created = set(proc.stdout.split())
    assert {"SnapshotShowRequest", "BasebackupPlanRequest", "BasebackupRequest"} <= created
    unsent = {"SnapshotCreateRequest", "SnapshotImportRequest", "NodeBranchRequest"}
    assert created.isdisjoint(unsent), sorted(created & unsent)
