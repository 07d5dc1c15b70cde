"""postmaster.stop against stand-in postmasters (a process named `postgres` with the data
directory on its command line, as `_is_our_postmaster` checks): the stop signals the process
through its descriptor and returns once it has exited, raises when it outlives the timeout,
and signals nothing that is not the directory's postmaster."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import postmaster
from proto.errors import ExternalCommandFailed, InvalidArgument

# Exits `delay` seconds after SIGINT (a fast shutdown's checkpoint), or never with "never".
STAND_IN = """
import signal, sys, time
delay = sys.argv[1]
def on_int(*_):
    if delay != "never":
        time.sleep(float(delay))
        sys.exit(0)
signal.signal(signal.SIGINT, on_int)
print("up", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _stand_in(
    procs: list[subprocess.Popen[bytes]], datadir: Path, delay: str, name: str = "postgres"
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [name, "-c", STAND_IN, delay, "-D", str(datadir)],
        executable=sys.executable,
        stdout=subprocess.PIPE,
    )
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    (datadir / "postmaster.pid").write_text(f"{proc.pid}\n{datadir}\n")
    return proc


def test_stop_returns_once_the_postmaster_has_exited(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[int] = []
    real = signal.pidfd_send_signal

    def send(pidfd: int, signum: int, *args: object) -> None:
        sent.append(signum)
        real(pidfd, signum)

    monkeypatch.setattr(postmaster.signal, "pidfd_send_signal", send)
    proc = _stand_in(procs, tmp_path, "0.3")
    began = time.monotonic()
    assert postmaster.stop(tmp_path, "fast", timeout=30)
    assert sent == [signal.SIGINT]  # through the process descriptor
    assert time.monotonic() - began >= 0.3
    assert proc.wait(timeout=5) == 0  # exited by itself, after its "checkpoint"
    assert postmaster.running_pid(tmp_path) is None
    assert not postmaster.stop(tmp_path, "fast")  # gone: nothing to stop


def test_stop_raises_when_the_postmaster_outlives_the_timeout(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = _stand_in(procs, tmp_path, "never")
    began = time.monotonic()
    with pytest.raises(ExternalCommandFailed, match="did not stop within"):
        postmaster.stop(tmp_path, "fast", timeout=0.3)
    assert time.monotonic() - began >= 0.3
    assert proc.poll() is None  # SIGINT was delivered and ignored; still there


def test_stop_signals_no_process_that_is_not_the_postmaster(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    other = _stand_in(procs, tmp_path, "0", name="not-a-server")
    assert not postmaster.stop(tmp_path, "immediate")
    with pytest.raises(subprocess.TimeoutExpired):  # a SIGQUIT would have ended it
        other.wait(timeout=2)


def test_stop_polls_where_no_process_descriptor_is_given(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(_pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(postmaster.os, "pidfd_open", unsupported)
    proc = _stand_in(procs, tmp_path, "0.1")
    assert postmaster.stop(tmp_path, "fast", timeout=30)
    assert proc.wait(timeout=5) == 0  # exited by its handler, not killed


def _pid_file_status(datadir: Path, pid: int, status: str) -> None:
    """postmaster.pid's eight lines (src/include/utils/pidfile.h), status last."""
    lines = [str(pid), str(datadir), str(int(time.time())), "5432", "/tmp", "*", "0 0", status]
    (datadir / "postmaster.pid").write_text("".join(f"{line}\n" for line in lines))


def _left_stopping(
    procs: list[subprocess.Popen[bytes]], datadir: Path, delay: str
) -> subprocess.Popen[bytes]:
    """A stand-in postmaster a killed checkout signalled (SIGINT), its status "stopping"."""
    proc = _stand_in(procs, datadir, delay)
    _pid_file_status(datadir, proc.pid, "stopping")
    proc.send_signal(signal.SIGINT)
    return proc


def test_wait_exiting_waits_for_a_postmaster_shutting_down(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A killed checkout's stop goes on without it: the next command waits for the exit."""
    proc = _left_stopping(procs, tmp_path, "0.3")
    began = time.monotonic()
    postmaster.wait_exiting(tmp_path, timeout=30)
    assert time.monotonic() - began >= 0.2
    assert proc.wait(timeout=5) == 0


def test_wait_exiting_refuses_a_postmaster_that_is_not_stopping(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = _stand_in(procs, tmp_path, "0")
    _pid_file_status(tmp_path, proc.pid, "ready")
    with pytest.raises(InvalidArgument, match="postgres runs on"):
        postmaster.wait_exiting(tmp_path, timeout=30)
    assert proc.poll() is None  # not signalled
    (tmp_path / "postmaster.pid").unlink()
    postmaster.wait_exiting(tmp_path, timeout=30)  # none: nothing to wait for


def test_a_signalled_stop_is_waited_for_later(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc = _stand_in(procs, tmp_path, "0.3")
    stopping = postmaster.signal_stop(tmp_path, "fast", timeout=30)
    assert stopping is not None
    try:
        assert not stopping.gone()  # signalled, still in its "checkpoint"
        stopping.wait()
        assert stopping.gone()
    finally:
        stopping.close()
    assert proc.wait(timeout=5) == 0
    assert postmaster.signal_stop(tmp_path, "fast") is None  # gone: nothing to stop


def test_wait_exiting_names_the_killed_checkouts_postmaster_still_exiting(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """No `-m immediate` hint: the user gave no mode, a killed checkout's stop is waited for."""
    proc = _left_stopping(procs, tmp_path, "never")
    with pytest.raises(ExternalCommandFailed, match="killed checkout") as raised:
        postmaster.wait_exiting(tmp_path, timeout=0.3)
    assert "immediate" not in str(raised.value)
    assert proc.poll() is None


def test_wait_exiting_waits_for_no_process_that_took_the_pid(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The postmaster exits and its PID names another process by the time the descriptor is
    opened (the reuse is stood in for: the descriptor given is the other process's): the
    check after the open sees the postmaster gone and nothing is waited for."""
    proc = _stand_in(procs, tmp_path, "0")
    _pid_file_status(tmp_path, proc.pid, "stopping")
    (tmp_path / "elsewhere").mkdir()
    other = _stand_in(procs, tmp_path / "elsewhere", "never", name="not-a-server")
    real = postmaster._process_fd

    def reused(pid: int) -> int | None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=5)
        return real(other.pid)

    monkeypatch.setattr(postmaster, "_process_fd", reused)
    began = time.monotonic()
    postmaster.wait_exiting(tmp_path, timeout=3)
    assert time.monotonic() - began < 2
    assert other.poll() is None
