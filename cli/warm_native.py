"""The native launcher's request (cli/neon_launcher.c) completed into the Python launcher's
(cli/warm_client.request_of), in the warm command server.

The native launcher sends what only it can know (argv and the environment as bytes, umask,
niceness, ignored and blocked signals, limits, the directory sys.path[0] would be, and its
Python launcher's interpreter, so that a server of another installation answers cold); what
a Python launcher would have added from its interpreter is then this server's own, the same
interpreter started from the same file: sys.flags (made from the PYTHON*
variables alone when no option is given, as none is in the launcher's shebang), sys.path
after the first entry (from those variables and the site directories: a .pth added since
makes the server stale, warm_server._Modules), and its standard streams' encodings and
error handlers (from those and the locale's variables). The server's check that the
variables read at start (PYTHON*, LC_*, LANG: `warm_server.import_time_env`) equal its own
runs on the completed request as on any, so a native launcher with other ones runs cold
(then its Python launcher asks again, with what its interpreter made of them).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from cli.launch import WARM_COMMANDS, command_of

PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)
"""What CPython ignores at its start (besides what it inherits ignored): the Python
launcher's request lists them, so its child ignores them as the cold command would."""


@dataclass(frozen=True, slots=True)
class Interpreter:
    """What a Python launcher's interpreter adds to its request, as this server has it."""

    executable: str
    flags: tuple[int, ...]
    path_tail: tuple[str, ...]
    """sys.path after its first entry (the launcher's directory)."""
    codecs: tuple[tuple[str, str], ...]
    """(encoding, errors) of stdin, stdout and stderr."""


def own_interpreter() -> Interpreter:
    """This process's (ValueError if it has no standard streams to model the child's on)."""
    models = (sys.__stdin__, sys.__stdout__, sys.__stderr__)
    codecs = tuple((m.encoding, m.errors) for m in models if m is not None and m.errors)
    if len(codecs) != len(models):
        raise ValueError("the server has no standard streams to model the child's on")
    return Interpreter(sys.executable, tuple(sys.flags), tuple(sys.path[1:]), codecs)


def completed(
    native: dict[str, Any], fds: list[int], interpreter: Interpreter | None = None
) -> dict[str, Any]:
    """The request a Python launcher in `native`'s place would have sent (`fds`: its
    descriptors cwd, 0, 1, 2 as received), its interpreter's parts `interpreter`'s (this
    process's by default). ValueError where this server cannot say."""
    own = interpreter or own_interpreter()
    env: dict[bytes, bytes] = native["env"]
    if len(fds) != 4:
        raise ValueError(f"{len(fds)} descriptors, not 4")
    # sys.path from the environment alone, as the server's was, but for relative entries of
    # PYTHONPATH (made absolute from the launcher's working directory) and PYTHONSAFEPATH
    # (no sys.path[0] at all): the Python launcher's own path then decides.
    if env.get(b"PYTHONSAFEPATH") or any(
        not entry.startswith(b"/") for entry in (env.get(b"PYTHONPATH") or b"/").split(b":")
    ):
        raise ValueError("PYTHONSAFEPATH or a relative PYTHONPATH entry")
    argv = [os.fsdecode(arg) for arg in native["argv"]]  # as the interpreter decodes argv
    if command_of(argv[1:])[1] not in WARM_COMMANDS:  # a launcher built from older sources
        raise ValueError(f"not a command that runs warm: {argv[1:3]}")
    # CPython's create_stdio: unbuffered (PYTHONUNBUFFERED non-empty; -u is never given):
    # write-through; else line-buffered on a terminal, and stderr always.
    buffered = not env.get(b"PYTHONUNBUFFERED")
    streams = [
        (encoding, errors, buffered and (os.isatty(fd) or n == 2), not buffered)
        for n, ((encoding, errors), fd) in enumerate(zip(own.codecs, fds[1:], strict=True))
    ]
    return {
        "argv": argv,
        "env": env,
        "umask": int(native["umask"]),
        "nice": int(native["nice"]),
        "path": [os.fsdecode(native["path0"]), *own.path_tail],
        "executable": os.fsdecode(native["executable"]),  # its Python launcher's
        "flags": own.flags,
        "streams": streams,
        "ignored": sorted({int(s) for s in native["ignored"]} | set(PYTHON_IGNORED)),
        "limits": {str(k): (int(s), int(h)) for k, (s, h) in native["limits"].items()},
        "blocked": [int(s) for s in native["blocked"]],
    }
