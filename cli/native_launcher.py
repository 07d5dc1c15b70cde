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

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cli.home_root import HOME_ENV, ROOT_DEFAULT_HOME
from cli.launch import (
    FORWARDED_SIGNALS,
    HANDSHAKE_TIMEOUT,
    REQUEST_MAX,
    SOCKET_NAME,
    WARM_COMMANDS,
    WARM_ENV,
)
from cli.warm_client import LIMITS

SOURCE = Path(__file__).with_name("neon_launcher.c")
PYTHON_LAUNCHER = "neon-python"
"""The Python launcher's name beside the native one."""
USER_HOME = "~/.neon"
"""chosen_home's default for a user other than root (cli/home_root.py)."""
CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
MARK = b"neon-native-launcher-"
"""In the program's bytes, followed by the digest of what built it (`_digest`)."""


def _c_string(text: str) -> str:
    if not text.isascii() or any(c in text for c in '"\\\n'):
        raise ValueError(f"not a plain C string: {text!r}")
    return f'"{text}"'


def config_header() -> str:
    """neon_launcher_config.h: the Python launcher's constants, for the native one."""
    commands = ", ".join(f"{{{_c_string(g)}, {_c_string(c)}}}" for g, c in sorted(WARM_COMMANDS))
    signals = ", ".join(name for name in FORWARDED_SIGNALS if hasattr(signal, name))
    limits = ", ".join(f"{{{_c_string(name)}, {name}}}" for name in LIMITS)
    return "\n".join(
        [
            "/* Written by cli/native_launcher.py from cli/launch.py, cli/home_root.py and",
            " * cli/warm_client.py: edit those. */",
            f"#define NEON_SOCKET_NAME {_c_string(SOCKET_NAME)}",
            f"#define NEON_WARM_ENV {_c_string(WARM_ENV)}",
            f"#define NEON_HOME_ENV {_c_string(HOME_ENV)}",
            f"#define NEON_ROOT_HOME {_c_string(ROOT_DEFAULT_HOME)}",
            f"#define NEON_USER_HOME {_c_string(USER_HOME)}",
            f"#define NEON_PYTHON_LAUNCHER {_c_string(PYTHON_LAUNCHER)}",
            f"#define NEON_HANDSHAKE_SECONDS {int(HANDSHAKE_TIMEOUT)}",
            f"#define NEON_REQUEST_MAX {REQUEST_MAX}",
            f"static const char *const NEON_WARM_COMMANDS[][2] = {{{commands}, {{NULL, NULL}}}};",
            f"static const int NEON_FORWARDED_SIGNALS[] = {{{signals}}};",
            "static const struct { const char *name; int resource; } NEON_LIMITS[] = "
            f"{{{limits}}};",
            f'static const char NEON_BUILD_MARK[] __attribute__((used)) = "{MARK.decode()}"'
            f' "{_digest()}";',
            "",
        ]
    )


def _digest() -> str:
    """What the program is built from: the source and the shared constants."""
    import hashlib

    h = hashlib.sha256(SOURCE.read_bytes())
    for value in (
        sorted(WARM_COMMANDS), FORWARDED_SIGNALS, LIMITS, SOCKET_NAME, WARM_ENV, HOME_ENV,
        ROOT_DEFAULT_HOME, USER_HOME, PYTHON_LAUNCHER, HANDSHAKE_TIMEOUT, REQUEST_MAX, CFLAGS,
    ):  # fmt: skip
        h.update(repr(value).encode())
    return h.hexdigest()[:16]


def is_native(path: Path) -> bool:
    """Whether `path` is a native launcher (of any build)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def up_to_date(path: Path) -> bool:
    """Whether `path` is the native launcher this source and these constants build."""
    try:
        return is_native(path) and MARK + _digest().encode() in path.read_bytes()
    except OSError:
        return False


def build(bin_dir: Path, compiler: str | None = None) -> str:
    """The native launcher as bin_dir/neon (see the module); what was done, in a line.
    Raises OSError or CalledProcessError if the build failed (bin_dir/neon is then the
    Python launcher)."""
    neon, python_launcher = bin_dir / "neon", bin_dir / PYTHON_LAUNCHER
    if not is_native(neon) and neon.exists():  # pip's script: kept as the Python launcher
        os.replace(neon, python_launcher)
    if not python_launcher.exists():
        raise FileNotFoundError(f"{python_launcher}: no Python launcher to fall back on")
    if up_to_date(neon):
        return f"{neon}: up to date"
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        shutil.copy2(python_launcher, neon)
        return f"{neon}: no C compiler; the Python launcher is used"
    with tempfile.TemporaryDirectory(prefix="neon-launcher-") as tmp:
        (Path(tmp) / "neon_launcher_config.h").write_text(config_header())
        out = Path(tmp) / "neon"
        try:
            subprocess.run(
                [cc, *CFLAGS, "-I", tmp, "-o", str(out), str(SOURCE)],
                check=True,
                capture_output=True,
                text=True,
            )
        except (OSError, subprocess.CalledProcessError):
            shutil.copy2(python_launcher, neon)  # not an older native one: out of date
            raise
        staged = bin_dir / ".neon.native"
        shutil.copy2(out, staged)
        os.replace(staged, neon)  # whole: a `neon` started meanwhile is one or the other
    return f"{neon}: native launcher built"


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m cli.native_launcher BIN_DIR", file=sys.stderr)
        return 2
    bin_dir = Path(sys.argv[1])
    try:
        print(f"setup: {build(bin_dir)}")
    except subprocess.CalledProcessError as exc:
        print(f"setup: the native launcher did not build; `neon` stays the Python launcher\n"
              f"{exc.stderr}", file=sys.stderr)  # fmt: skip
    except OSError as exc:
        print(f"setup: the native launcher: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
