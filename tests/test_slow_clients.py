"""Slow and hostile clients with nothing in front of `vidgate serve` (issue 24, A4 and A5; app/core/server.py).

- A 200 MiB header is refused (431) while it is still arriving, and the process's memory does not grow
  with it.
- A connection that sits silent, trickles its head or trickles its body is closed by the server.
- 2,000 such connections at once do not stop another client from being served.
- A client that writes its whole oversized body before reading (Python's urllib) sees the 413, every time.

Counts and events only: bytes the client could send, the process's resident memory, answers and closes.
Real `vidgate serve` processes on loopback, against this module's database."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, Procs, Simulator, gateway_env

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import proc_db_fixture as proc_db_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@pytest.fixture(scope="module")
async def quick(module_procs: Procs, proc_db: str, simulator_proc: Simulator) -> AsyncIterator[Gateway]:
    """A gateway that gives a head or a body one second."""
    env = gateway_env(
        proc_db,
        simulator_proc,
        VIDGATE_RUN_WORKER="false",
        VIDGATE_CLIENT_HEADER_TIMEOUT_S="1",
        VIDGATE_CLIENT_BODY_TIMEOUT_S="1",
    )
    gw = await module_procs.serve(env, name="serve-quick")
    yield gw
    await gw.http.aclose()


@pytest.fixture(scope="module")
async def patient(module_procs: Procs, proc_db: str, simulator_proc: Simulator) -> AsyncIterator[Gateway]:
    """A gateway whose slow connections outlive the test's checks (their closing is `quick`'s)."""
    env = gateway_env(proc_db, simulator_proc, VIDGATE_RUN_WORKER="false", VIDGATE_CLIENT_HEADER_TIMEOUT_S="120")
    gw = await module_procs.serve(env, name="serve-patient")
    yield gw
    await gw.http.aclose()


def address(gw: Gateway) -> tuple[str, int]:
    host, port = gw.url.removeprefix("http://").split(":")
    return host, int(port)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_huge_header(where: tuple[str, int], total: int) -> tuple[int, bytes]:
    """Send a request whose one header is `total` bytes long; return how much could be sent, and the answer."""
    sent = 0
    with socket.create_connection(where, timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Huge: ")
        chunk = b"a" * (256 * 1024)
        try:
            while sent < total:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # refused and closed: what is being checked
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    return sent, answer


async def test_a_200_mib_header_is_refused_while_it_is_read(quick: Gateway) -> None:
    before = resident_bytes(quick.proc.pid)
    sent, answer = await asyncio.to_thread(send_huge_header, address(quick), 200 * MiB)
    after = resident_bytes(quick.proc.pid)
    # Refused at 32 KiB; what the client could still push is what the lingering close discards (16 MiB)
    # plus the sockets' buffers, not the 200 MiB.
    assert sent < 40 * MiB, sent
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert b'"code":"headers_too_large"' in answer
    assert after - before < 32 * MiB, (before, after)
    assert (await quick.http.get("/healthz")).status_code == 200


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a hang guard, not a speed claim)."""
    return await asyncio.wait_for(reader.read(), 60)


async def test_a_silent_connection_is_closed(quick: Gateway) -> None:
    reader, writer = await asyncio.open_connection(*address(quick))
    try:
        assert await read_until_closed(reader) == b""  # opened and never used: nothing to answer
    finally:
        writer.close()


async def test_a_trickled_head_is_closed_with_408(quick: Gateway) -> None:
    reader, writer = await asyncio.open_connection(*address(quick))
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        await writer.drain()
        answer = read_until_closed(reader)
        trickle = asyncio.ensure_future(_trickle(writer, b"st: gateway\r\nX-Slow: " + b"a" * 200))
        received = await answer
        trickle.cancel()
        assert received.startswith(b"HTTP/1.1 408 "), received[:100]
        assert b'"code":"request_timeout"' in received
    finally:
        writer.close()


async def test_a_trickled_body_is_closed_with_408(quick: Gateway) -> None:
    reader, writer = await asyncio.open_connection(*address(quick))
    try:
        writer.write(
            b"POST /api/v1/models/ltx-2-19b/generate HTTP/1.1\r\nHost: gateway\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"image":'
        )
        await writer.drain()
        trickle = asyncio.ensure_future(_trickle(writer, b" " * 900))
        received = await read_until_closed(reader)
        trickle.cancel()
        assert received.startswith(b"HTTP/1.1 408 "), received[:100]
    finally:
        writer.close()
    # The app that waited for that body saw the client gone: the process serves on, with no error logged.
    assert (await quick.http.get("/healthz")).status_code == 200


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One byte at a time, slower than any timeout allows in total (ends when the server closes)."""
    for byte in data:
        if writer.is_closing():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except OSError:
            return
        await asyncio.sleep(0.05)


SLOW_CONNECTIONS = 2000


async def test_2000_slow_connections_do_not_stop_other_clients(patient: Gateway) -> None:
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for number in range(SLOW_CONNECTIONS):
            reader, writer = await asyncio.open_connection(*address(patient))
            # Half sit silent, half have started a head they never finish.
            if number % 2:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: gate")
            opened.append((reader, writer))
        await asyncio.gather(*(w.drain() for _, w in opened))

        # Another client is served, on new connections, while all of them are held open.
        async with httpx.AsyncClient(base_url=patient.url, trust_env=False, timeout=30) as other:
            for _ in range(5):
                assert (await other.get("/healthz")).status_code == 200
                assert (await other.get("/readyz")).status_code == 200
        assert sum(reader.at_eof() for reader, _ in opened) == 0  # they were all still open meanwhile
    finally:
        for _, writer in opened:
            writer.close()


def urllib_post(url: str, size: int) -> int | str:
    request = urllib.request.Request(
        url, data=b"{" + b" " * (size - 1), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return int(refused.code)
    except OSError as broken:  # urllib.error.URLError too: a broken pipe or a reset instead of the answer
        return type(broken).__name__ + ": " + str(broken)


async def test_a_client_that_writes_its_whole_oversized_body_first_sees_the_413(quick: Gateway) -> None:
    """urllib writes the whole body before it reads: closed at once, the server's unread data turned into a
    reset that destroyed the 413 three times in five."""
    url = quick.url + "/api/v1/models/ltx-2-19b/generate"
    outcomes = [await asyncio.to_thread(urllib_post, url, size) for size in (256 * 1024, 2 * MiB, 8 * MiB) * 10]
    assert outcomes == [413] * len(outcomes)


def chunked_post(where: tuple[str, int], size: int) -> bytes:
    """A chunked body past the limit, written whole before reading (the 413 comes as it streams in)."""
    with socket.create_connection(where, timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/models/ltx-2-19b/generate HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 65536
        try:
            for _ in range(size // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError as broken:
            return type(broken).__name__.encode()
        try:
            return sock.recv(4096)
        except OSError as broken:
            return type(broken).__name__.encode()


async def test_a_chunked_oversized_body_written_whole_first_sees_the_413(quick: Gateway) -> None:
    answers = [await asyncio.to_thread(chunked_post, address(quick), 2 * MiB) for _ in range(10)]
    assert [a[:13] for a in answers] == [b"HTTP/1.1 413 "] * len(answers), answers
