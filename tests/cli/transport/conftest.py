"""Real peers for the transport tests: an sshd and an aiohttp file server on 127.0.0.1, each
serving a directory of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.httpd import FileServer, file_server
from tests.sshd import SshServer, ssh_server


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with ssh_server() as server:
        yield server


@pytest.fixture
def ssh_env(sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> SshServer:
    """The ssh client of this process set up for `sshd` (NEON_SSH_COMMAND)."""
    monkeypatch.setenv("NEON_SSH_COMMAND", sshd.ssh_command)
    return sshd


@pytest.fixture
def remote_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="neon-transport-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def httpd(remote_dir: Path) -> Iterator[FileServer]:
    with file_server(remote_dir) as server:
        yield server


def entries(directory: Path) -> list[str]:
    """Everything in `directory`, hidden files included."""
    return sorted(os.listdir(directory))
