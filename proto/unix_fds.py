"""Length-prefixed messages with open descriptors attached (SCM_RIGHTS) over a unix socket,
and the peer's user id (SO_PEERCRED).

Shared by the daemon's local basebackup socket (pageserver/api/local_files.py: msgpack
bodies) and the warm command server (cli/launch.py, cli/warm_server.py: marshal bodies).
Standard library only: `neon`'s launcher imports it before anything else.
"""

from __future__ import annotations

import _socket  # not socket: its enums and selectors cost `neon`'s launcher ~5 ms
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # not typing itself (the launcher's every millisecond is every command's)
    from collections.abc import Iterable

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_FD = struct.Struct("i")
SUN_PATH_MAX = 107
"""The longest path of a unix socket (sockaddr_un's sun_path holds 108 bytes with the NUL)."""


class PeerClosed(OSError):
    """The peer closed the connection before a message was whole."""


class MessageTooLarge(OSError):
    """A message's length is above what the receiver accepts."""

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(f"a message of {size} bytes is too large (at most {max_size})")
        self.size = size


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """The pid, user and group ids of the process at the other end of a unix socket (when
    it connected; pid 0: in a pid namespace this one cannot see)."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size)
    )
    return pid, uid, gid


def peer_uid(sock: _socket.socket) -> int:
    """The user id of the process at the other end of a unix socket (when it connected)."""
    return peer_credentials(sock)[1]


def send_with_fds(sock: _socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """All of `data`, with `fds` attached to its first bytes."""
    fds = list(fds)
    rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    sent = sock.sendmsg([data], rights) if fds else 0
    sock.sendall(data[sent:])


def receive_with_fds(
    sock: _socket.socket, header: struct.Struct, max_size: int, max_fds: int
) -> tuple[bytearray, list[int]]:
    """One message whose length is `header` (one unsigned field) and the descriptors
    attached to it (close-on-exec; the caller closes them). PeerClosed if the peer closes
    first, MessageTooLarge above `max_size`; the descriptors are closed on either."""
    data, ancillary, _flags, _addr = sock.recvmsg(
        header.size, _socket.CMSG_LEN(max_fds * _FD.size), _socket.MSG_CMSG_CLOEXEC
    )  # (socket.recv_fds would drop MSG_CMSG_CLOEXEC: it passes no flags on)
    fds = [
        fd
        for level, kind, rights in ancillary
        if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS)
        for (fd,) in _FD.iter_unpack(rights[: len(rights) - len(rights) % _FD.size])
    ]
    try:
        if not data:
            raise PeerClosed("the peer closed the connection")
        while len(data) < header.size:
            data += _receive(sock, header.size - len(data))
        (size,) = header.unpack(data)
        if size > max_size:
            raise MessageTooLarge(size, max_size)
        body = bytearray()
        while len(body) < size:
            body += _receive(sock, size - len(body))
        return body, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _receive(sock: _socket.socket, n: int) -> bytes:
    data = sock.recv(n)
    if not data:
        raise PeerClosed("the peer closed the connection mid-message")
    return data
