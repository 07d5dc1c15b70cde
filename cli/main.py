"""The `neon` command: the top-level group, global options and error reporting."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import NoReturn

import click

from cli.home import NeonHome
from cli.registry import registry_error
from durable_files import PRIVATE_UMASK
from pageserver_api.errors import error_from_os
from proto.errors import NeonError


class NeonGroup(click.Group):
    """Turns every NeonError into one line on stderr and its exit code."""

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


@click.group(cls=NeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="NEON_HOME",
    default=None,
    help="State directory (default: $NEON_HOME, else ~/.neon, or /var/lib/neon as root).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Git-like history for PostgreSQL data directories."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


def _register_commands() -> None:
    from cli.debug_commands import debug_group
    from cli.pageserver_commands import pageserver_group
    from cli.pg_commands import pg_group
    from cli.pitr_commands import pitr_group
    from cli.snapshot_commands import snapshot_group
    from cli.storage_commands import storage_group
    from cli.waldump import waldump_command

    for command in (
        pg_group,
        storage_group,
        pageserver_group,
        waldump_command,
        debug_group,
        snapshot_group,
        pitr_group,
    ):
        cli.add_command(command)


def main() -> None:
    # Everything pg-neon writes (history, WAL, registries, logs, secrets) is private to its
    # owner; files PostgreSQL must read are handed to its account explicitly.
    os.umask(PRIVATE_UMASK)
    _register_commands()
    cli(prog_name="neon")


if __name__ == "__main__":
    main()
