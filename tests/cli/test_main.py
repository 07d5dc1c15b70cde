"""The top-level `neon` group loads its subcommands lazily: `neon --help` must still list every
command with its own short help, and a command must not import the others' modules."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from cli.main import LAZY_COMMANDS, _load_command, cli


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_short_help_is_the_commands_own(name: str) -> None:
    command = _load_command(name)
    assert LAZY_COMMANDS[name][2] == command.get_short_help_str(limit=200)


def test_help_lists_every_command() -> None:
    ctx = click.Context(cli, info_name="neon")
    text = cli.get_help(ctx)
    for name, (_module, _attribute, short_help) in LAZY_COMMANDS.items():
        assert f"{name} " in text and short_help[:30] in text.replace("\n", " ")


def test_a_command_imports_only_its_own_modules() -> None:
    """`neon snapshot --help` must not load the node, PITR or debug commands (start-up time)."""
    code = (
        "import sys; sys.argv = ['neon', 'snapshot', '--help']\n"
        "from cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m in ('cli.pg_commands', "
        "'cli.debug_commands', 'cli.pitr_commands', 'cli.pageserver_commands')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_commands_modules_are_frozen_for_the_collector() -> None:
    """Once a command is loaded (here `snapshot push`: a subcommand of a lazy group, itself
    loaded lazily), what its modules made is out of the collector's generations (gc.freeze):
    neither the collections during the command nor the one at exit walk it."""
    code = (
        "import gc, sys; sys.argv = ['neon', 'snapshot', 'push', '--help']\n"
        "from cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "push = vars(sys.modules['cli.snapshot_transfer'])\n"
        "collected = any(o is push for o in gc.get_objects())\n"
        "print(gc.get_freeze_count(), gc.is_tracked(push), collected)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    frozen, tracked, collected = out.stdout.split()[-3:]
    assert int(frozen) > 10_000
    assert (tracked, collected) == ("True", "False")
