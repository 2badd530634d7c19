"""Free TCP ports on the loopback interface, for the test servers in ``support.postgres`` and
``support.live_server``."""

from __future__ import annotations

import socket

__all__ = ["free_port", "listening_socket"]


def listening_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1 (at ``port``, or a free one) and listening; the caller owns it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A restarted server binds its old port while the old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def free_port() -> int:
    """A port that was free a moment ago, for a process that binds it itself (there is a small race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
