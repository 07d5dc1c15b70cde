"""A TCP relay on 127.0.0.1 in front of a local server, for tests that need to bound what
reaches it: bytes a sender wrote before it was killed still arrive from the kernel's socket
buffers (on loopback up to tcp_wmem's 4 MiB plus an autotuned receive buffer of up to
tcp_rmem's 32 MiB on this box), so a kill alone does not say how much a server gets."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


def pump(
    source: socket.socket, sink: socket.socket, budget: int | None, hold: bool = False
) -> None:
    """Copy `source` to `sink` (at most `budget` bytes), then close both. `hold`: past the
    budget, read on and drop what comes until `source` ends, so that its sender, still
    connected as over a stalled network, sees the end only when it dies."""
    try:
        while data := source.recv(65536):
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            if data:
                sink.sendall(data)
            if budget == 0 and not hold:
                break
    except OSError:
        pass
    for s in (source, sink):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@dataclass
class Relay:
    """Listens on 127.0.0.1:`port` (picked at `start`) and serves each connection, meant for
    127.0.0.1:`upstream_port`, on a thread of its own (`_serve`)."""

    upstream_port: int
    port: int = 0
    _listener: socket.socket | None = None
    _accepting: threading.Thread | None = None

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def stop(self) -> None:
        """No more connections: the accept ends (a close alone does not wake an accept
        blocked in another thread on Linux: shutdown does)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accepting is not None:
            self._accepting.join(timeout=10)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError


@dataclass
class CappedRelay(Relay):
    """Forwards connections to the upstream; a connection opened while `cap` is set forwards
    at most `cap` of its client's bytes (pump's `hold`)."""

    cap: int | None = None

    def url(self, url: str) -> str:
        """`url` (of the upstream) with this relay's port."""
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and parts.port == self.upstream_port, url
        return urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))

    def _serve(self, client: socket.socket) -> None:
        cap = self.cap
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()
        pump(client, upstream, cap, hold=True)


@contextlib.contextmanager
def capped_relay(url: str) -> Iterator[CappedRelay]:
    """A relay in front of the server at `url` (on 127.0.0.1)."""
    port = urlsplit(url).port
    assert port is not None, url
    relay = CappedRelay(port)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
