"""A real OpenSSH server on 127.0.0.1 for tests, with throwaway host and user keys.

`/usr/sbin/sshd -D` runs from a private directory (config, keys, authorized_keys, log) on a
free port, accepting only the throwaway user key; it is stopped by its PID. The client side
is an ssh_config in the same directory (user key, a known_hosts holding the server's key),
used through NEON_SSH_COMMAND="ssh -F CONFIG", so the user's own ~/.ssh never matters.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.pgtest import free_port

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd running as root refuses to start without it
START_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class SshServer:
    root: Path
    port: int
    user: str

    @property
    def client_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def ssh_command(self) -> str:
        """NEON_SSH_COMMAND for a client that knows this server's key and has the user key."""
        return f"ssh -F {self.client_config}"

    def url(self, path: str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def env(self) -> dict[str, str]:
        return {"NEON_SSH_COMMAND": self.ssh_command}

    def config_without_host_key(self) -> Path:
        """An ssh_config whose known_hosts is empty: the server's key is unknown."""
        path = self.root / "ssh_config_unknown_host"
        text = self.client_config.read_text().replace(
            str(self.root / "known_hosts"), str(self.root / "known_hosts_empty")
        )
        (self.root / "known_hosts_empty").touch()
        path.write_text(text)
        return path

    def config_with_other_key(self) -> Path:
        """An ssh_config offering a key the server does not accept."""
        path = self.root / "ssh_config_other_key"
        _keygen(self.root / "other_key")
        text = self.client_config.read_text().replace(
            str(self.root / "user_key"), str(self.root / "other_key")
        )
        path.write_text(text)
        return path


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "neon-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}: {log.read_text()}")


@contextlib.contextmanager
def ssh_server() -> Iterator[SshServer]:
    """A running sshd on 127.0.0.1 and the client setup to reach it; stopped by PID."""
    root = Path(tempfile.mkdtemp(prefix="neon-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        _keygen(root / "host_key")
        _keygen(root / "user_key")
        shutil.copy(root / "user_key.pub", root / "authorized_keys")
        port = free_port()
        (root / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\n"
            f"HostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
            f"PidFile none\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"  # the temporary directory's parents are not root's own
            "UsePAM no\n"
            "X11Forwarding no\n"
            "AllowTcpForwarding no\n"
            "LogLevel VERBOSE\n"
            # The login shell is told it is not a top-level one: bash sources ~/.bashrc for
            # a top-level shell started by sshd (SSH_CLIENT set, SHLVL below 2), even with
            # `-c`. This box's root .bashrc runs `pyenv init` (~110 ms a session: the whole
            # of a session on the shared connection but ~10 ms), where a stock Debian
            # .bashrc returns at once when not interactive. A far host's rc is not ours to
            # measure; each session here still starts the login shell.
            "SetEnv SHLVL=1\n"
        )
        host_key = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        (root / "ssh_config").write_text(
            "Host *\n"
            f"  IdentityFile {root / 'user_key'}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {root / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
        )
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        log = root / "sshd.log"
        proc = subprocess.Popen(
            [SSHD, "-D", "-E", str(log), "-f", str(root / "sshd_config"), "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(port, proc, log)
        yield SshServer(root, port, getpass.getuser())
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
