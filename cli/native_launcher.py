"""Builds `neon`'s native launcher (cli/neon_launcher.c) into a venv's bin directory.

`python -m cli.native_launcher BIN` (scripts/setup.sh, after pip): the Python launcher pip
wrote as BIN/neon becomes BIN/neon-python (PYTHON_LAUNCHER), and BIN/neon the native one,
which execs it for whatever does not run warm. Without a C compiler, or if the build fails,
BIN/neon stays the Python launcher and `neon` works as before (only slower to start). Run
again, it rebuilds what is out of date: pip reinstalling the package writes its script
over BIN/neon again, an edited source or constant makes a new program.

The constants the two launchers share come from the Python modules (`config_header`), so
they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cli.home_root import HOME_ENV, ROOT_DEFAULT_HOME, USER_DEFAULT_HOME
from cli.launch import (
    FORWARDED_SIGNALS,
    HANDSHAKE_TIMEOUT,
    REQUEST_MAX,
    SOCKET_NAME,
    TRIED_ENV,
    WARM_COMMANDS,
    WARM_ENV,
)
from cli.warm_client import GROUP_SIGNALS, LIMITS

SOURCE = Path(__file__).with_name("neon_launcher.c")
PYTHON_LAUNCHER = "neon-python"
"""The Python launcher's name beside the native one."""
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
MARK = b"neon-native-launcher-"
"""In the program's bytes, followed by the digest of what built it (`config_header`)."""


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./~ ")


def _c_string(text: str | bytes) -> str:
    """A C string literal of `text` (bytes as they are: a path in any encoding)."""
    raw = os.fsencode(text) if isinstance(text, str) else text
    return '"' + "".join(chr(b) if b in _PLAIN else f"\\{b:03o}" for b in raw) + '"'


def interpreter_of(python_launcher: Path) -> str:
    """The interpreter on the Python launcher's `#!` line (pip's script names its venv's).
    ValueError where that is not one absolute Python path without options (pip's `/bin/sh`
    trampoline for a long path, `/usr/bin/env python3`, `-E`...): the native launcher could
    not say what the Python one runs, so it is not built."""
    with open(python_launcher, "rb") as f:
        first = f.readline(4096)
    words = first[2:].split() if first.startswith(b"#!") else []
    if len(words) != 1 or not words[0].startswith(b"/") or b"python" not in words[0]:
        raise ValueError(f"{python_launcher}: not a Python path alone on its #! line: {first!r}")
    return os.fsdecode(words[0])


def config_header(bin_dir: Path, executable: str) -> str:
    """neon_launcher_config.h: the Python launcher's constants, for the native one;
    `executable`: the Python launcher's interpreter, the one a warm server must run
    (warm_server._cold's "another interpreter")."""
    commands = ", ".join(f"{{{_c_string(g)}, {_c_string(c)}}}" for g, c in sorted(WARM_COMMANDS))
    signals = ", ".join(name for name in FORWARDED_SIGNALS if hasattr(signal, name))
    group_signals = ", ".join(signal.Signals(s).name for s in GROUP_SIGNALS)
    limits = ", ".join(f"{{{_c_string(name)}, {name}}}" for name in LIMITS)
    lines = [
        "/* Written by cli/native_launcher.py from cli/launch.py, cli/home_root.py and",
        " * cli/warm_client.py: edit those. */",
        f"#define NEON_SOCKET_NAME {_c_string(SOCKET_NAME)}",
        f"#define NEON_WARM_ENV {_c_string(WARM_ENV)}",
        f"#define NEON_TRIED_ENV {_c_string(TRIED_ENV)}",
        f"#define NEON_HOME_ENV {_c_string(HOME_ENV)}",
        f"#define NEON_ROOT_HOME {_c_string(ROOT_DEFAULT_HOME)}",
        f"#define NEON_USER_HOME {_c_string(USER_DEFAULT_HOME)}",
        f"#define NEON_PYTHON_LAUNCHER {_c_string(PYTHON_LAUNCHER)}",
        f"#define NEON_BIN_DIR {_c_string(os.path.realpath(bin_dir))}",
        f"#define NEON_EXECUTABLE {_c_string(executable)}",
        f"#define NEON_HANDSHAKE_USEC {round(HANDSHAKE_TIMEOUT * 1e6)}LL",
        f"#define NEON_REQUEST_MAX {REQUEST_MAX}",
        f"static const char *const NEON_WARM_COMMANDS[][2] = {{{commands}, {{NULL, NULL}}}};",
        f"static const int NEON_FORWARDED_SIGNALS[] = {{{signals}}};",
        f"static const int NEON_GROUP_SIGNALS[] = {{{group_signals}}};",
        f"static const struct {{ const char *name; int resource; }} NEON_LIMITS[] = {{{limits}}};",
    ]
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), *lines, *CFLAGS]).encode())
    mark = f"{MARK.decode()}{digest.hexdigest()[:16]}"
    lines.append(f'static const char NEON_BUILD_MARK[] __attribute__((used)) = "{mark}";')
    return "\n".join([*lines, ""])


def _mark_of(header: str) -> bytes:
    return header.rsplit(MARK.decode(), 1)[1].split('"', 1)[0].encode()


class NoPythonLauncher(Exception):
    """Neither pip's script nor an earlier build's copy of it: nothing to build beside."""


def is_native(path: Path) -> bool:
    """Whether `path` is a native launcher (of any build)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def up_to_date(path: Path, header: str) -> bool:
    """Whether `path` is the native launcher `header` (config_header) builds."""
    try:
        return is_native(path) and MARK + _mark_of(header) in path.read_bytes()
    except OSError:
        return False


def _install(source: Path, target: Path) -> None:
    """`source`'s bytes and mode as `target`, whole: a `neon` started meanwhile runs the one
    or the other (and one running now keeps its own: a new file, not a rewrite)."""
    staged = target.with_name(f".{target.name}.new")
    shutil.copy2(source, staged)
    os.replace(staged, target)


def build(bin_dir: Path, compiler: str | None = None) -> str:
    """The native launcher as bin_dir/neon (see the module); what was done, in a line.
    Raises OSError, ValueError or CalledProcessError if the build failed (bin_dir/neon is
    then the Python launcher)."""
    neon, python_launcher = bin_dir / "neon", bin_dir / PYTHON_LAUNCHER
    if not is_native(neon) and neon.exists():  # pip's script: kept as the Python launcher
        _install(neon, python_launcher)
    if not python_launcher.exists():
        raise NoPythonLauncher(f"{python_launcher}: no Python launcher to fall back on")
    try:
        header = config_header(bin_dir, interpreter_of(python_launcher))
        if up_to_date(neon, header):
            return f"{neon}: up to date"
        cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            _install(python_launcher, neon)
            return f"{neon}: no C compiler; the Python launcher is used"
        with tempfile.TemporaryDirectory(prefix="neon-launcher-") as tmp:
            (Path(tmp) / "neon_launcher_config.h").write_text(header)
            out = Path(tmp) / "neon"
            subprocess.run(
                [*cc.split(), *CFLAGS, "-I", tmp, "-o", str(out), str(SOURCE)],
                check=True,
                capture_output=True,
                text=True,
            )
            _install(out, neon)
    except (OSError, ValueError, subprocess.CalledProcessError):
        _install(python_launcher, neon)  # not an older native one: out of date
        raise
    return f"{neon}: native launcher built"


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m cli.native_launcher BIN_DIR", file=sys.stderr)
        return 2
    bin_dir = Path(sys.argv[1])
    try:
        print(f"setup: {build(bin_dir)}")
    except NoPythonLauncher as exc:
        print(f"setup: the native launcher: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        print(f"setup: the native launcher did not build ({detail}); `neon` stays the Python"
              " launcher", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
