"""The state files an in-place checkout keeps beside a node's directory (cli/checkout_delta.py
says what each means), and their removal once no checkout is pending.

A module of its own because every `pg start` and `pg checkout` removes leftovers
(cli/checkout.py finish_pending) before anything else: importing them with the delta machinery
(the applier, the `.neon` delta reader, asyncio) cost those commands' start 50-70 ms, and a
checkout imports that machinery while PostgreSQL writes its shutdown checkpoint instead.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cli.registry import NodeRow


def has_tablespace_links(datadir: Path) -> bool:
    """The directory has tablespace links: only a full rebuild places the node's tablespaces
    (cli/tablespace_restore.py), so neither an in-place checkout nor its immediate stop."""
    spaces = datadir / "pg_tblspc"
    return spaces.is_dir() and any(spaces.iterdir())


def applying_file(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout.applying")


def applied_file(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout.applied")


def old_wal_dir(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout.oldwal")


def stale_dir(node: NodeRow) -> Path:
    """Where the files of the directory that the delta does not name are moved to."""
    return node.datadir.with_name(node.datadir.name + ".checkout.stale")


def remove_leftovers(node: NodeRow) -> None:
    """Once no checkout is pending (or it is sealed): its state files are waste."""
    for path in (applying_file(node), applied_file(node)):
        path.unlink(missing_ok=True)
    for path in (old_wal_dir(node), stale_dir(node)):
        remover = removing.get(path)
        if remover is None or remover.poll() is not None:  # else it is being deleted
            shutil.rmtree(path, ignore_errors=True)


removing: dict[Path, subprocess.Popen[bytes]] = {}
"""Directories set aside that a process this one started is deleting (`remove_later`)."""


def remove_later(path: Path) -> None:
    """Delete a directory set aside beside the node's in a process of its own (`rm -rf`),
    which this command does not wait for, not even at its exit: on ext4 mounted with
    `discard` each unlink of a file that was written back waits for its blocks' trim (7 ms
    a 16 MiB WAL segment), and the old pg_wal of a node that loaded a gigabyte has dozens
    (a thread deleting them held the CLI's exit, which waits for its threads, by a third of
    a second). A deletion killed half way is finished by `remove_leftovers` (the next
    checkout, start or destroy of the node); one that cannot start (no `rm` on PATH) is
    done here."""
    try:
        removing[path] = subprocess.Popen(
            ["rm", "-rf", "--", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
