"""A response's head goes out with its body in one write (app/core/server.py, _LingeringTransport): uvicorn
writes them in two calls, which were two send(2) calls and two packets per answer. What the transport
under uvicorn's request cycle is asked to do, call by call; the whole suite runs real servers over it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from app.core.server import GuardedHttpProtocol, _LingeringTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


@dataclass
class Cycle:
    response_started: bool = False
    response_complete: bool = False


@dataclass
class Transport:
    calls: list[tuple[str, Any]] = field(default_factory=list)
    closing: bool = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, data: list[bytes]) -> None:
        self.calls.append(("writelines", list(data)))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def is_closing(self) -> bool:
        return self.closing


@dataclass
class Protocol:
    loop: asyncio.AbstractEventLoop
    transport: Transport
    cycle: Cycle | None = None

    def close_lingering(self) -> None:
        self.transport.calls.append(("close", None))


def wrapped() -> tuple[_LingeringTransport, Protocol, Transport]:
    transport = Transport()
    protocol = Protocol(asyncio.get_running_loop(), transport)
    lingering = _LingeringTransport(cast(asyncio.Transport, transport), cast(GuardedHttpProtocol, protocol))
    return lingering, protocol, transport


async def next_turn() -> None:
    await asyncio.sleep(0)


async def test_a_head_and_its_body_written_in_one_turn_are_one_write() -> None:
    lingering, protocol, transport = wrapped()
    for body in (b"{}", b"[]"):  # two responses on one connection: each head waits for its body
        protocol.cycle = Cycle(response_started=True)
        lingering.write(HEAD)
        assert transport.calls[-1:] != [("write", HEAD)]
        lingering.write(body)
        protocol.cycle.response_complete = True
    await next_turn()
    assert transport.calls == [("write", HEAD + b"{}"), ("write", HEAD + b"[]")]


async def test_a_large_body_is_not_copied_to_join_its_head() -> None:
    lingering, protocol, transport = wrapped()
    protocol.cycle = Cycle(response_started=True)
    lingering.write(HEAD)
    body = b"x" * (1024 * 1024)
    lingering.write(body)
    assert transport.calls == [("write", HEAD), ("write", body)]


async def test_a_head_whose_body_is_late_goes_alone_at_the_next_turn_and_chunks_go_at_once() -> None:
    lingering, protocol, transport = wrapped()
    protocol.cycle = Cycle(response_started=True)
    lingering.write(HEAD)
    assert transport.calls == []
    await next_turn()
    assert transport.calls == [("write", HEAD)]
    lingering.write(b"chunk")
    assert transport.calls[-1] == ("write", b"chunk")


async def test_a_100_continue_is_written_at_once() -> None:
    lingering, protocol, transport = wrapped()
    protocol.cycle = Cycle(response_started=False)
    lingering.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.calls == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]


async def test_a_held_head_goes_before_a_close_or_an_eof() -> None:
    for end in ("close", "write_eof"):
        lingering, protocol, transport = wrapped()
        protocol.cycle = Cycle(response_started=True)
        lingering.write(HEAD)
        getattr(lingering, end)()
        assert transport.calls == [("write", HEAD), (end, None)]
        await next_turn()
        assert transport.calls == [("write", HEAD), (end, None)]  # not twice


async def test_a_head_held_when_the_connection_is_closing_is_dropped() -> None:
    lingering, protocol, transport = wrapped()
    protocol.cycle = Cycle(response_started=True)
    lingering.write(HEAD)
    transport.closing = True
    await next_turn()
    assert transport.calls == []
