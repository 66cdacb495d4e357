"""Free loopback ports for the servers the benchmark and the test suite start (one implementation for both).

A port is chosen here and bound later by another process, so it must not be one the kernel can hand to
anyone else in between. The kernel's own `bind(("127.0.0.1", 0))` answers from the ephemeral range, the
same range every outgoing connection and every other `bind(0)` draws its local port from: CI once lost a
sandbox gateway that way ("address already in use" on a port this function had just returned). So ports
come from below the ephemeral range, which the kernel never hands out by itself, and each pytest-xdist
worker draws from its own slice of it, so two workers never choose the same one.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOWEST = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; elsewhere the bind check below still rules out a taken port


def _slice() -> range:
    """This process's ports: its xdist worker's share of the ports below the ephemeral range."""
    top = max(_ephemeral_start(), _LOWEST + 2_000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    width = (top - _LOWEST) // max(count, 1)
    start = _LOWEST + (index % max(count, 1)) * width
    return range(start, start + width)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port never handed out before in this process: HTTP clients keep idle keep-alive
    connections, and one to a stopped server must never be reused for a new server on its port."""
    ports = _slice()
    # A random start, so two runs side by side (a developer's and a benchmark's) rarely meet.
    first = random.randrange(len(ports))
    for offset in range(len(ports)):
        port = ports[(first + offset) % len(ports)]
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port left in {ports.start}-{ports.stop - 1}")
