"""The launcher's reading of `neon`'s arguments (cli/launch.py): which command, which home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.home import NeonHome
from cli.launch import SOCKET_NAME, WARM_COMMANDS, command_of, warm_socket


def test_the_command_and_home_come_after_the_global_options() -> None:
    assert command_of(["pg", "checkout", "n@s"]) == (None, ("pg", "checkout"))
    assert command_of(["--home", "/h", "pg", "list", "--json"]) == ("/h", ("pg", "list"))
    assert command_of(["--home=/h", "--pageserver", "neon://x:1", "snapshot", "push"]) == (
        "/h",
        ("snapshot", "push"),
    )
    assert command_of(["--pageserver=neon://x:1", "pg", "show"]) == (None, ("pg", "show"))
    assert command_of(["-h"]) == (None, ())
    assert command_of(["--home"]) == (None, ())
    assert command_of(["--unknown", "pg", "list"]) == (None, ())


def test_only_allowed_commands_with_a_socket_go_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEON_HOME", str(tmp_path))
    monkeypatch.delenv("NEON_WARM", raising=False)
    assert warm_socket(["pg", "list"]) is None  # no socket
    (tmp_path / "pageserver").mkdir()
    (tmp_path / "pageserver" / SOCKET_NAME).touch()
    assert warm_socket(["pg", "list"]) == str(tmp_path / "pageserver" / SOCKET_NAME)
    assert warm_socket(["pg", "connect", "n"]) is None
    assert warm_socket(["pageserver", "start"]) is None
    assert warm_socket(["snapshot", "recv"]) is None
    monkeypatch.setenv("NEON_WARM", "0")
    assert warm_socket(["pg", "list"]) is None


def test_the_launcher_finds_the_home_the_cli_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One rule (cli.home_root): --home, then NEON_HOME, relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEON_WARM", raising=False)
    for option, env in ((None, "rel-env"), ("rel-option", "other"), (None, str(tmp_path / "h"))):
        monkeypatch.setenv("NEON_HOME", env)
        home = NeonHome.resolve(None if option is None else Path(option)).root
        (home / "pageserver").mkdir(parents=True, exist_ok=True)
        (home / "pageserver" / SOCKET_NAME).touch()
        argv = ["pg", "list"] if option is None else ["--home", option, "pg", "list"]
        assert warm_socket(argv) == os.path.join(home, "pageserver", SOCKET_NAME)


def test_no_prompting_or_serving_command_is_allowed() -> None:
    for command in (("pg", "connect"), ("pg", "destroy"), ("pg", "attach"), ("storage", "attach")):
        assert command not in WARM_COMMANDS
    assert not any(group in ("pageserver", "console", "debug") for group, _ in WARM_COMMANDS)


LAUNCHER_MODULES = ("cli.launch", "cli.home_root", "cli.warm_client")
LAUNCHER_AVOIDS = frozenset(
    {"pathlib", "re", "enum", "socket", "selectors", "signal", "contextlib", "collections",
     "functools", "typing", "types", "importlib.util", "urllib.parse"}
)  # fmt: skip
"""What `neon`'s launcher (its interpreter's start and its own modules) must not import:
every warm command waits for it (~12 ms for setuptools' editable-install hook, ~10 ms for
socket's and signal's enums, selectors and contextlib's collections)."""


def test_the_launcher_imports_little() -> None:
    """The venv's interpreter starts with no import hook (pyproject's package-dir: a .pth
    naming the checkout), and the launcher's modules take only the standard library's
    smallest (_socket, _signal, struct, marshal)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {', '.join(LAUNCHER_MODULES)}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert set(LAUNCHER_MODULES) <= modules, proc.stderr
    assert not modules & LAUNCHER_AVOIDS, sorted(modules & LAUNCHER_AVOIDS)
    assert not [m for m in modules if m.startswith("__editable__")], sorted(modules)
