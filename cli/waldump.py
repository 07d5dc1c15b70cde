"""`neon waldump`: decode WAL segment files like pg_waldump (being built)."""

from __future__ import annotations

import click


@click.command("waldump")
def waldump_command() -> None:
    """Decode WAL segment files like pg_waldump."""
    raise click.ClickException("not yet built")
