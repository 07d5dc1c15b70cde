"""The launcher's reading of `neon`'s arguments (cli/launch.py): which command, which home."""

from __future__ import annotations

import os
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
