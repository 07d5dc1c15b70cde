"""Free-port checks on the loopback interface."""

from __future__ import annotations

import errno
import socket


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now.

    SO_REUSEADDR as PostgreSQL sets it: connections in TIME_WAIT do not make a port busy.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True
