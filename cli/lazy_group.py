"""A click group whose subcommands live in other modules and are imported only when used.

Every `neon` invocation pays for the modules its command group imports: `neon snapshot
create` imported the transports, the import and export machinery and the WAL receiver
because the `snapshot` group's module named those commands. A `LazyGroup` names them by
module and attribute instead, with the short help `--help` shows without importing them.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Mapping

import click

SHORT_HELP_LIMIT = 300
"""Longer than any first sentence: `--help` shows it whole, as the lazy entries hold it."""


class LazyGroup(click.Group):
    """`lazy`: name -> (module, attribute, short help); the commands defined on the group
    itself load with it as usual."""

    def __init__(
        self, *args: object, lazy: Mapping[str, tuple[str, str, str]] | None = None, **kw: object
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.lazy: dict[str, tuple[str, str, str]] = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in self.lazy:
            command = load_command(self.lazy[cmd_name])
            self.add_command(command, cmd_name)
            # The command's modules are loaded: their objects (modules, classes, functions:
            # ~25k for `pg checkout`) live until the process exits. Moved out of the
            # collector's generations, they are walked neither by the collections during
            # the command nor by the one at exit: ~12 ms of CPU of every command, as much
            # as `neon pg checkout` spends on its eight daemon round trips.
            gc.freeze()
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command's whole first sentence, loaded or not (click cuts loaded ones short)."""
        rows = [
            (name, self.commands[name].get_short_help_str(SHORT_HELP_LIMIT))
            if name in self.commands
            else (name, self.lazy[name][2])
            for name in self.list_commands(ctx)
            if not (name in self.commands and self.commands[name].hidden)
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def load_command(entry: tuple[str, str, str]) -> click.Command:
    module, attribute, _help = entry
    command = getattr(importlib.import_module(module), attribute)
    assert isinstance(command, click.Command)
    return command
