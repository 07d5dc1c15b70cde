"""The native launcher (cli/neon_launcher.c, built by cli/native_launcher.py into the venv
as `neon`): against a recording warm server, it leads to the very request the Python
launcher sends, hands everything else to the Python launcher, and exits as the command did.
The real server and daemon with it: tests/e2e/test_warm_commands.py (which runs `neon`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli.launch import SOCKET_NAME, WARM_COMMANDS
from cli.native_launcher import (
    PYTHON_LAUNCHER,
    build,
    config_header,
    interpreter_of,
    is_native,
    main,
    up_to_date,
)
from cli.warm_client import receive_message, send_message
from cli.warm_native import Interpreter, completed
from tests.neoncli import NEON

PYTHON_NEON = str(Path(NEON).with_name(PYTHON_LAUNCHER))


def _header(bin_dir: Path) -> str:
    return config_header(bin_dir, interpreter_of(bin_dir / PYTHON_LAUNCHER))


def test_setup_installed_the_native_launcher_beside_the_python_one() -> None:
    assert is_native(Path(NEON)), f"{NEON}: not the native launcher; run `make setup`"
    assert up_to_date(Path(NEON), _header(Path(NEON).parent)), f"{NEON}: run `make setup`"
    assert interpreter_of(Path(PYTHON_NEON)) == sys.executable


@dataclass
class RecordingServer:
    """A warm server's socket that answers each connection from `answers` (a status: ready,
    then that wait status once it says go; a string: cold, why) and keeps the requests,
    completed as the real server completes a native one (with the descriptors it got)."""

    path: Path
    answers: list[int | str]
    requests: list[dict[str, Any]] = field(default_factory=list)
    interpreter: Interpreter | None = None
    """The real server's interpreter parts (a fresh interpreter's, not pytest's)."""

    def serve(self, listener: socket.socket) -> None:
        for answer in self.answers:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request, fds = receive_message(conn, max_fds=4)
                try:
                    if request.get("native"):
                        request = {**completed(request, fds, self.interpreter), "native": True}
                    self.requests.append(request)
                finally:
                    for fd in fds:
                        os.close(fd)
                if isinstance(answer, str):
                    send_message(conn, {"cold": answer})
                    continue
                send_message(conn, {"ready": 1})
                go, _ = receive_message(conn)
                assert go == {"go": 1}
                send_message(conn, {"status": answer})


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "home" / "pageserver").mkdir(parents=True)
    return tmp_path / "home"


def fresh_interpreter(env: dict[str, str]) -> Interpreter:
    """A fresh interpreter's parts, as the warm server (`python -m cli.warm_server`) has them."""
    code = "from cli.warm_native import own_interpreter as o; print(repr(o()))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    return eval(out, {"Interpreter": Interpreter})  # type: ignore[no-any-return]


@pytest.fixture
def serving(home: Path) -> Iterator[RecordingServer]:
    server = RecordingServer(home / "pageserver" / SOCKET_NAME, [])
    server.interpreter = fresh_interpreter(dict(os.environ))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(server.path))
    listener.listen(8)
    thread: threading.Thread | None = None

    def start(*answers: int | str) -> None:
        nonlocal thread
        server.answers = list(answers)
        thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
        thread.start()

    server.start = start  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        listener.close()
        if thread is not None:
            thread.join(timeout=10)


def _run(
    launcher: str, home: Path, *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if k != "NEON_WARM"}
    return subprocess.run(
        [launcher, *args],
        env={**base, "NEON_HOME": str(home), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        cwd=home,
        **kw,
    )


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED", "buffered"])
@pytest.mark.parametrize("terminal", [False, True], ids=["pipes", "stdout-a-terminal"])
def test_the_native_request_completes_into_the_python_launchers(
    home: Path, serving: RecordingServer, unbuffered: str, terminal: bool
) -> None:
    """Same environment, descriptors, signals and limits: the server gets the same request
    from either launcher (the interpreter's parts made by the server from its own)."""
    serving.start(0, 0)  # type: ignore[attr-defined]
    env = {"PYTHONUNBUFFERED": unbuffered}
    leader, follower = os.openpty() if terminal else (-1, -1)
    try:
        for launcher in (NEON, PYTHON_NEON):
            done = subprocess.run(
                [launcher, "snapshot", "list", "--json"],
                env={**os.environ, "NEON_HOME": str(home), **env},
                stdin=subprocess.DEVNULL,
                stdout=follower if terminal else subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=30,
                cwd=home,
            )
            assert done.returncode == 0, done.stderr
    finally:
        if terminal:
            os.close(leader)
            os.close(follower)
    native, python = serving.requests
    assert native.pop("native") and "native" not in python
    assert native["argv"][0] == NEON and python["argv"][0] == PYTHON_NEON
    assert native["argv"][1:] == python["argv"][1:] == ["snapshot", "list", "--json"]
    native["argv"] = python["argv"] = []
    python["ignored"] = sorted(python["ignored"])
    python["blocked"] = sorted(python["blocked"])
    assert native == python
    assert python["streams"][1][2:] == (not unbuffered and terminal, bool(unbuffered))


def test_an_ignored_signal_and_a_lower_limit_reach_the_request(
    home: Path, serving: RecordingServer
) -> None:
    serving.start(0)  # type: ignore[attr-defined]

    def confine() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        os.umask(0o027)
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))

    done = _run(NEON, home, "pg", "list", preexec_fn=confine)
    assert done.returncode == 0, done.stderr
    (request,) = serving.requests
    assert signal.SIGHUP in request["ignored"] and signal.SIGPIPE in request["ignored"]
    assert signal.SIGUSR2 in request["blocked"]
    assert request["umask"] == 0o027 and request["limits"]["RLIMIT_NOFILE"] == (100, 200)


def test_a_cold_answer_hands_the_command_to_the_python_launcher(
    home: Path, serving: RecordingServer
) -> None:
    serving.start("told to", 3 << 8)  # type: ignore[attr-defined]
    done = _run(NEON, home, "--home", str(home), "pg", "list")
    assert done.returncode == 3, done.stderr
    native, python = serving.requests
    assert native.get("native") and "native" not in python
    assert python["argv"] == [PYTHON_NEON, "--home", str(home), "pg", "list"]


@pytest.mark.parametrize("launcher", [NEON, PYTHON_NEON], ids=["native", "python"])
@pytest.mark.parametrize(
    "status", [0, 7 << 8, int(signal.SIGTERM), int(signal.SIGKILL)], ids=["0", "7", "TERM", "KILL"]
)
def test_the_launcher_exits_as_the_command_did(
    home: Path, serving: RecordingServer, status: int, launcher: str
) -> None:
    serving.start(status)  # type: ignore[attr-defined]
    done = _run(launcher, home, "pg", "list")
    assert done.returncode == os.waitstatus_to_exitcode(status), done.stderr
    assert not done.stderr
    assert bool(serving.requests[0].get("native")) == (launcher == NEON)


def test_in_the_c_locale_the_python_launcher_asks(home: Path, serving: RecordingServer) -> None:
    """CPython coerces a C locale (LC_CTYPE=C.UTF-8 in its environment): the server would
    answer the native request cold, so the native launcher leaves it to the Python one."""
    serving.start(0)  # type: ignore[attr-defined]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    done = subprocess.run(
        [NEON, "pg", "list"], env={**base, "NEON_HOME": str(home), "LANG": "C"},
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (request,) = serving.requests
    assert "native" not in request and request["env"][b"LC_CTYPE"] == b"C.UTF-8"


def test_what_the_server_cannot_complete_is_refused(tmp_path: Path) -> None:
    """A relative PYTHONPATH entry (absolute from the launcher's cwd) or PYTHONSAFEPATH:
    only the Python launcher's interpreter knows its sys.path."""
    native = {
        "argv": [b"neon", b"pg", b"list"], "path0": b"/bin", "executable": b"/usr/bin/python3",
        "umask": 0, "nice": 0, "ignored": [], "limits": {}, "blocked": [],
    }  # fmt: skip
    fds = [os.open("/", os.O_RDONLY) for _ in range(4)]
    try:
        assert completed({**native, "env": {b"PYTHONPATH": b"/a:/b"}}, fds)["path"][0] == "/bin"
        assert completed({**native, "env": {b"PYTHONPATH": b""}}, fds)  # ignored by CPython
        for env in ({b"PYTHONPATH": b"/a:src"}, {b"PYTHONPATH": b"/a:"}, {b"PYTHONSAFEPATH": b"1"}):
            with pytest.raises(ValueError):
                completed({**native, "env": env}, fds)
        with pytest.raises(ValueError, match="not a command that runs warm"):
            completed({**native, "argv": [b"neon", b"pageserver", b"start"], "env": {}}, fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_the_home_is_found_as_the_cli_finds_it(tmp_path: Path) -> None:
    """NEON_HOME (`~` expanded from $HOME), --home and --home=: that home's socket is asked."""
    for env, args in [
        ({"HOME": str(tmp_path), "NEON_HOME": "~/.neon"}, []),
        ({"HOME": f"{tmp_path}/", "NEON_HOME": "~/.neon"}, []),
        ({"NEON_HOME": str(tmp_path / ".neon")}, []),
        ({"NEON_HOME": "/nonexistent"}, ["--home", str(tmp_path / ".neon")]),
        ({"NEON_HOME": "/nonexistent"}, [f"--home={tmp_path / '.neon'}"]),
    ]:
        sock_dir = tmp_path / ".neon" / "pageserver"
        sock_dir.mkdir(parents=True, exist_ok=True)
        server = RecordingServer(sock_dir / SOCKET_NAME, [5 << 8])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(server.path))
            listener.listen(1)
            thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
            thread.start()
            base = {k: v for k, v in os.environ.items() if k not in ("NEON_HOME", "NEON_WARM")}
            done = subprocess.run(
                [NEON, *args, "pg", "list"], env={**base, **env}, capture_output=True, timeout=30
            )
            thread.join(timeout=10)
        server.path.unlink()
        assert done.returncode == 5, (env, args, done.stderr)
        assert server.requests[0].get("native")


def test_what_may_not_run_warm_never_asks_the_server(home: Path) -> None:
    """Not on the allowlist, or NEON_WARM=0: straight to the Python launcher, which runs it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(home / "pageserver" / SOCKET_NAME))
        listener.listen(1)
        listener.settimeout(0.2)
        assert ("pageserver", "status") not in WARM_COMMANDS
        done = _run(NEON, home, "pageserver", "status", "--help")
        assert done.returncode == 0 and b"Usage: neon pageserver status" in done.stdout, done
        done = _run(NEON, home, "pg", "list", "--help", env={"NEON_WARM": "0"})
        assert done.returncode == 0 and b"Usage: neon pg list" in done.stdout, done
        with pytest.raises(TimeoutError):
            listener.accept()


def _pip_script(path: Path, text: str) -> None:
    path.write_text(f"#!{sys.executable}\n{text}\n")
    path.chmod(0o755)


def test_build_keeps_pips_script_as_the_python_launcher_and_rebuilds_when_needed(
    tmp_path: Path,
) -> None:
    _pip_script(tmp_path / "neon", "# pip's, first")
    assert build(tmp_path).endswith("native launcher built")
    assert is_native(tmp_path / "neon") and up_to_date(tmp_path / "neon", _header(tmp_path))
    assert "first" in (tmp_path / PYTHON_LAUNCHER).read_text()
    assert build(tmp_path).endswith("up to date")
    _pip_script(tmp_path / "neon", "# pip's, again")  # a reinstall writes over it
    assert build(tmp_path).endswith("native launcher built")
    assert "again" in (tmp_path / PYTHON_LAUNCHER).read_text() and is_native(tmp_path / "neon")


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/cc"], ids=["fails", "missing"])
def test_without_a_compiler_neon_stays_the_python_launcher(
    tmp_path: Path, compiler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pip_script(tmp_path / "neon", "# pip's")
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(sys, "argv", ["native_launcher", str(tmp_path)])
    assert main() == 0  # setup goes on
    assert (tmp_path / "neon").read_text() == (tmp_path / PYTHON_LAUNCHER).read_text()


@pytest.mark.parametrize(
    "first", ["#!/bin/sh", "#!/usr/bin/env python3", "#!/usr/bin/python3 -E", "# no #! line"]
)
def test_a_python_launcher_whose_interpreter_is_unclear_is_not_built_beside(
    tmp_path: Path, first: str
) -> None:
    (tmp_path / "neon").write_text(f"{first}\nprint()\n")
    with pytest.raises(ValueError):
        build(tmp_path)
    assert (tmp_path / "neon").read_text() == (tmp_path / PYTHON_LAUNCHER).read_text()


def test_the_header_carries_every_allowed_command() -> None:
    header = _header(Path(NEON).parent)
    for group, command in WARM_COMMANDS:
        assert f'{{"{group}", "{command}"}}' in header
    assert f'"{SOCKET_NAME}"' in header
