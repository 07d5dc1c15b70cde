"""The `neon` command: the top-level group, global options and error reporting."""

from __future__ import annotations

import faulthandler
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import NoReturn

import click

from cli.home import NeonHome
from cli.lazy_group import LazyGroup, load_command
from cli.registry import registry_error
from durable_files import PRIVATE_UMASK
from pageserver_api.errors import error_from_os
from proto.errors import NeonError


class NeonGroup(LazyGroup):
    """Turns every NeonError into one line on stderr and its exit code; loads subcommands
    from LAZY_COMMANDS when used."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except NeonError as exc:
            _fail(exc)
        except OSError as exc:
            # A full or read-only filesystem, a path we may not use: one line, no traceback.
            _fail(error_from_os(exc))
        except sqlite3.Error as exc:
            home = ctx.obj.get("home") if isinstance(ctx.obj, dict) else None
            _fail(registry_error(exc, NeonHome.resolve(home).registry_path))
        except KeyboardInterrupt:
            click.echo("neon: interrupted", err=True)
            sys.exit(130)


def _fail(exc: NeonError) -> NoReturn:
    click.echo(f"neon: error: {exc}", err=True)
    sys.exit(exc.exit_code)


# Subcommands load on use: a command imports only its own modules, not every other
# command's (the CLI's start-up is paid by every invocation, and by every benchmark).
# name -> (module, attribute, the short help `neon --help` shows without importing it)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "pg": ("cli.pg_commands", "pg_group", "PostgreSQL nodes: data directories and their servers."),
    "storage": (
        "cli.storage_commands",
        "storage_group",
        "Storages: native directories, S3 buckets, remote pageservers.",
    ),
    "pageserver": (
        "cli.pageserver_commands",
        "pageserver_group",
        "The pageserver daemon that keeps page history.",
    ),
    "waldump": ("cli.waldump", "waldump_command", "Decode WAL segment files like pg_waldump."),
    "debug": ("cli.debug_commands", "debug_group", "Developer tools."),
    "snapshot": (
        "cli.snapshot_group",
        "snapshot_group",
        "Snapshots: cheap named states of a node (PGDATA@TAG), and imported databases (NAME).",
    ),
    "pitr": (
        "cli.pitr_commands",
        "pitr_group",
        "PITR areas: any LSN or time inside one can be extracted as a snapshot.",
    ),
    "console": ("cli.console_command", "console_command", "A web console on 127.0.0.1."),
}
"""tests/cli/test_main.py checks that each short help is the command's own."""


@click.group(
    cls=NeonGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="NEON_HOME",
    default=None,
    help="State directory (default: $NEON_HOME, else ~/.neon, or /var/lib/neon as root).",
)
@click.option(
    "--pageserver",
    envvar="NEON_PAGESERVER",
    default=None,
    metavar="neon://HOST:PORT",
    help="Talk to this pageserver (a container's, say) instead of the home's own; its token "
    "from ?token= or NEON_TOKEN.",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None, pageserver: str | None) -> None:
    """Git-like history for PostgreSQL data directories."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home
    ctx.obj["pageserver"] = pageserver


def _load_command(name: str) -> click.Command:
    return load_command(LAZY_COMMANDS[name])


def main() -> None:
    # Everything pg-neon writes (history, WAL, registries, logs, secrets) is private to its
    # owner; files PostgreSQL must read are handed to its account explicitly.
    os.umask(PRIVATE_UMASK)
    # `kill -USR1 PID` of a command that seems stuck prints where each thread waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli(prog_name="neon")


if __name__ == "__main__":
    main()
