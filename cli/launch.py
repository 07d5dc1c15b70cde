"""`neon`'s entry point: a command on the allowlist runs in the home's warm command server
when one is there (cli/warm_server.py), every other one in this process as always.

A `neon` process spends ~0.14 s of CPU before its command runs (the interpreter, click,
asyncio, our modules: bench/README.md, `checkout`); a 1% `pg checkout` or an incremental
push is not much more. The home's pageserver daemon keeps a process with those modules
imported; this launcher, which imports only the standard library's os, sys, signal, socket,
struct and marshal, hands it the command (argv, the environment, umask, the working
directory and descriptors 0-2, SCM_RIGHTS) over a unix socket in the daemon's working
directory, and the server forks a child that runs `cli.main.main()` on them. The launcher
forwards signals to that child and exits as it did (its code, or the same signal).

`neon` in the venv is usually the native launcher (cli/neon_launcher.c, built by
cli/native_launcher.py): the same exchange without this interpreter's start, which execs this
launcher (`neon-python`) for whatever it does not hand to the server.

Anything else runs the command here, exactly as before (`cli.main.main`): NEON_WARM=0, no
socket, a refused connection, a server that answers "cold" (a module changed on disk since
it imported it, an environment variable read at import time differs, another interpreter),
any error before the server forks.

The allowlist (WARM_COMMANDS): non-interactive commands whose latency matters. Left out:
whatever prompts or needs the terminal (the child has no controlling terminal, and
getpass opens /dev/tty: `storage attach`, `pg destroy`/`pg attach` confirmations, `pg
connect`), whatever serves or runs for long (`pageserver start/stop/run`, `snapshot recv`,
`snapshot serve`, `console`, `pg start-rest`), and everything else nobody waits on.
"""

from __future__ import annotations

import os
import sys

SOCKET_NAME = "warm-cli-1.sock"
"""In the daemon's working directory (<home>/pageserver), beside its local basebackup socket."""
WARM_ENV = "NEON_WARM"
"""NEON_WARM=0: never use the warm server."""
TRIED_ENV = "NEON_WARM_TRIED"
"""Set by the native launcher (cli/neon_launcher.c) for this one: the server took its request
and did not answer in time, or broke off; this launcher does not ask again. Removed from the
environment before the command runs."""
WARM_COMMANDS = frozenset(
    {
        ("pg", "checkout"),
        ("pg", "create"),
        ("pg", "list"),
        ("pg", "show"),
        ("pg", "start"),
        ("pg", "stop"),
        ("snapshot", "create"),
        ("snapshot", "list"),
        ("snapshot", "push"),
        ("snapshot", "pull"),
        ("snapshot", "start"),
        ("snapshot", "stop"),
        ("snapshot", "diff"),
        ("pitr", "list"),
        ("pitr", "commits"),
        ("pitr", "extract-snapshot"),
        ("storage", "list"),
        ("storage", "show"),
    }
)
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1")
"""Sent on to the child (SIGUSR1: the stacks `tests/neoncli.py` asks for). A terminal's
SIGINT and SIGQUIT go to the child's process group, as the terminal's would. Ctrl-Z
(SIGTSTP) stops the child and then the launcher, SIGCONT continues both (warm_client)."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds the launcher waits for the server before the fork (then it runs the command
itself): a stuck server never stops a command."""
REQUEST_MAX = 4 << 20


def command_of(argv: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """The --home option and the first two words of the command (the group, the command)
    of `neon ARGV`; () where an option this launcher does not know comes first."""
    home: str | None = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        if arg in ("--home", "--pageserver"):
            if i + 1 >= len(argv):
                return home, ()
            if arg == "--home":
                home = argv[i + 1]
            i += 2
        elif arg.startswith("--home="):
            home = arg[len("--home=") :]
            i += 1
        elif arg.startswith("--pageserver="):
            i += 1
        else:
            return home, ()
    return home, tuple(argv[i : i + 2])


def warm_socket(argv: list[str]) -> str | None:
    """The warm server's socket for `neon ARGV`, if the command may run warm and there is one."""
    if os.environ.pop(TRIED_ENV, None) is not None or os.environ.get(WARM_ENV) == "0":
        return None
    home, command = command_of(argv)
    if command not in WARM_COMMANDS:
        return None
    from cli.home_root import chosen_home

    path = os.path.join(os.path.abspath(os.path.expanduser(chosen_home(home))), "pageserver")
    path = os.path.join(path, SOCKET_NAME)
    return path if os.path.exists(path) else None


def main() -> None:
    path = warm_socket(sys.argv[1:])
    if path is not None:
        from cli.warm_client import run_warm

        run_warm(path)  # returns only if the command is to run here
    from cli.main import main as cold_main

    cold_main()
