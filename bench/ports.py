"""Free loopback ports for the servers the benchmark and the test suite start (one implementation for both)."""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this process: HTTP clients keep idle keep-alive
    connections, and one to a stopped server must never be reused for a new server on its port."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
