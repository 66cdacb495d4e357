"""The loopback ports the suite hands its subprocesses (bench/ports.py)."""

from __future__ import annotations

import socket

import pytest

from bench import ports


def test_ports_come_from_below_the_ephemeral_range() -> None:
    # A port the kernel could give an outgoing connection before the server binds it lost CI a sandbox
    # gateway ("address already in use").
    chosen = [ports.free_port() for _ in range(50)]
    assert all(10_000 <= port < ports._ephemeral_start() for port in chosen), chosen
    assert len(set(chosen)) == len(chosen)


def test_xdist_workers_draw_from_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(set(ports._slice()))
    assert all(len(s) > 1_000 for s in slices)
    assert not (slices[0] & slices[1]) and not (slices[1] & slices[2]) and not (slices[0] & slices[2])


def test_a_port_something_listens_on_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr(ports, "_slice", lambda: range(taken, taken + 1))
        with pytest.raises(RuntimeError, match="no free loopback port"):
            ports.free_port()
