"""Descriptors over a unix socket (proto/unix_fds.py): the daemon's local basebackup socket
and the warm command server's requests."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from proto.unix_fds import peer_credentials, receive_with_fds, send_with_fds

HEADER = struct.Struct(">I")


def test_descriptors_arrive_with_their_message_close_on_exec() -> None:
    """The message whole, each descriptor once, each close-on-exec (socket.recv_fds, which
    this replaced, dropped the MSG_CMSG_CLOEXEC it was given: the daemon's threads start
    processes, which would have inherited a request's descriptors)."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read, write = os.pipe()
    try:
        body = b"x" * 70_000  # more than one segment of the socket's buffer
        send_with_fds(left, HEADER.pack(len(body)) + body, [read, write, 0])
        got, fds = receive_with_fds(right, HEADER, 1 << 20, 4)
        try:
            assert bytes(got) == body
            assert len(fds) == 3
            assert [os.fstat(fd).st_ino for fd in fds] == [
                os.fstat(fd).st_ino for fd in (read, write, 0)
            ]
            assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert peer_credentials(right) == (os.getpid(), os.geteuid(), os.getegid())
    finally:
        for fd in (read, write):
            os.close(fd)
        left.close()
        right.close()
