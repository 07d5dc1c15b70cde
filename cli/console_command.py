"""`neon console`: the web console, served from this process until Ctrl-C."""

from __future__ import annotations

import click

from cli.context import get_app


@click.command("console")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Port (default: any free).")
@click.option("--no-browser", is_flag=True, help="Print the login URL without opening a browser.")
@click.pass_context
def console_command(ctx: click.Context, port: int, no_browser: bool) -> None:
    """A web console on 127.0.0.1.

    Prints a URL with a one-time login token (and opens it in a browser unless --no-browser);
    every page and action runs the `neon` command it shows. Ctrl-C stops it."""
    from cli.console.app import serve  # aiohttp and Jinja2 load for this command only

    app = get_app(ctx)
    serve(app.home.root, port, open_browser=not no_browser)
