"""How `vidgate serve` runs uvicorn, and the HTTP/1.1 protocol it runs it with: uvicorn's httptools protocol
plus what it lacks against slow and hostile clients with nothing in front (issue 24, A4 and A5).

- A request head (request line and headers) larger than `MAX_HEAD_BYTES` is refused with 431 while it is
  still arriving: httptools itself keeps a header growing for as long as it is sent (a 200 MiB header
  took 400 MB). At most one socket read (256 KiB) past the limit is ever held.
- A head must be complete within VIDGATE_CLIENT_HEADER_TIMEOUT_S of its first byte (of the connection, for
  its first request), a body within VIDGATE_CLIENT_BODY_TIMEOUT_S of its head; a connection trickling
  either, or opened and left silent, is closed (408 when nothing was answered yet). Idle keep-alive
  connections are closed by uvicorn's keep-alive timeout.
- Lingering close, as nginx does it: when the answer is given before the request's body was read (413,
  or any early answer on a connection that closes), the gateway sends its answer and a FIN, then reads
  and discards what the client still sends, up to `LINGER_BYTES` or `LINGER_S`. Closed at once instead, a
  socket with unread data sends RST, which destroys the answer in flight: a client that writes its whole
  body before reading (Python's urllib) saw a broken pipe instead of the 413.

bench/slowclients.py measures these against uvicorn's defaults (figures in bench/FINDINGS.md).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, cast

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.core.guard import MAX_HEADERS_BYTES, HeadersTooLarge
from app.core.settings import get_settings

log = logging.getLogger("vidgate.server")

MAX_HEAD_BYTES = MAX_HEADERS_BYTES  # the whole head: request line, names, values and line ends
LINGER_BYTES = 16 * 1024 * 1024
LINGER_S = 5.0
KEEP_ALIVE_S = 75


def _problem_response(status: int, reason: bytes, body: dict[str, Any]) -> bytes:
    payload = orjson.dumps(body)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(payload),
            b"connection: close\r\n\r\n",
            payload,
        ]
    )


_HEAD_TOO_LARGE = _problem_response(
    431,
    b"Request Header Fields Too Large",
    HeadersTooLarge(
        f"The request line and headers together may hold at most {MAX_HEAD_BYTES} bytes.",
        field="headers",
        limit=MAX_HEAD_BYTES,
    ).body(),
)
_TIMED_OUT = _problem_response(
    408,
    b"Request Timeout",
    {
        "type": "https://vidgate.dev/problems/request_timeout",
        "title": "Request not received in time",
        "status": 408,
        "code": "request_timeout",
        "detail": "The request's headers or body arrived too slowly; send it again.",
    },
)


_JOIN_MAX = 64 * 1024  # a larger body goes in a write of its own rather than be copied


class _LingeringTransport:
    """The transport as uvicorn's request cycles see it: its close() lingers when the request was not read
    to its end, and a response's head goes out with the first write of its body. Everything else is the
    real transport's.

    Why the head waits: uvicorn writes the head (on http.response.start) and then the body in two calls,
    each a send(2) on an idle socket, so every answer cost two system calls and two packets (on this
    machine a send(2) on loopback is among the costliest calls a request makes: bench/FINDINGS.md, issue
    25). The head is held for the body's first write, which an app sends in the same turn of the loop,
    and sent with it in one call; if the body is not there by the loop's next turn (a stream waiting for
    its first chunk), the head goes alone then. Only the head waits: a 100 Continue (written before any
    response starts) and body chunks go at once."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._head: bytes | None = None
        self._head_of: object = None  # the request cycle whose head was held: one per response

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if len(data) <= _JOIN_MAX:
                # One buffer: uvloop sends it at once (writelines() would queue it to the loop's turn end).
                self._transport.write(head + data)
                return
            self._transport.write(head)
        cycle = self._protocol.cycle
        if cycle is not None and cycle is not self._head_of and cycle.response_started and not cycle.response_complete:
            self._head_of, self._head = cycle, data
            self._protocol.loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._protocol.close_lingering()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        settings = get_settings()
        self.head_timeout_s = settings.client_header_timeout_s
        self.body_timeout_s = settings.client_body_timeout_s
        self.real_transport = transport
        self.transport = cast(asyncio.Transport, _LingeringTransport(transport, self))
        self.in_head = False
        self.head_bytes = 0
        self.answered = False  # something was written for the request being read
        self.lingering = False
        self.discarded = 0
        self.timer: asyncio.TimerHandle | None = None
        self._arm(self.head_timeout_s)  # a connection that never sends a byte is closed too

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.discarded += len(data)
            if self.discarded > LINGER_BYTES:
                self.real_transport.close()
            return
        super().data_received(data)
        if self.in_head and not self.lingering:
            # Counted after parsing: a read that completed the head (and carries some body) is not a head.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(_HEAD_TOO_LARGE)

    def eof_received(self) -> None:
        if self.lingering:
            self.real_transport.close()  # the client is done sending: our answer reached it

    # httptools' callbacks, around uvicorn's

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_bytes = 0
        self.answered = False
        self._arm(self.head_timeout_s)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # closing

    def _refuse(self, response: bytes) -> None:
        if not self.real_transport.is_closing():
            self.real_transport.write(response)
        self.answered = True
        self.close_lingering(force=True)

    def _timed_out(self) -> None:
        self.timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self.in_head:
            if cycle.response_started:
                self.real_transport.close()  # an answer is on its way and cannot be finished: end it
                return
            # The body never came: the app waiting for it sees the client gone, the client a 408.
            cycle.disconnected = True
            cycle.message_event.set()
            self._refuse(_TIMED_OUT)
            return
        if self.in_head:
            self._refuse(_TIMED_OUT)
            return
        self.real_transport.close()  # opened and never used, or between requests: nothing to answer

    def close_lingering(self, force: bool = False) -> None:
        """Close, but first let the client finish sending (discarded) if the request was not read to its end."""
        transport = self.real_transport
        if transport.is_closing() or self.lingering:
            return
        cycle = self.cycle
        unread = force or (cycle is not None and cycle.more_body)
        if not unread or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        self.in_head = False
        self._disarm()
        self.timer = self.loop.call_later(LINGER_S, transport.close)
        transport.write_eof()  # our FIN after the answer; reading goes on
        transport.resume_reading()
        if self.flow is not None:
            self.flow.read_paused = False


def raise_open_files_limit() -> None:
    """Each client connection is a file descriptor: allow as many as the system lets this process have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open files limit", extra={"soft": soft, "hard": hard})


def run(app: Any, *, host: str, port: int, workers: int, drain_s: float, grace_s: float) -> None:
    """uvicorn with the guarded protocol. After SIGTERM the app drains for `drain_s` (app/core/lifecycle.py);
    then uvicorn waits for the requests in flight, leaving time within `grace_s` for the lifespan's
    shutdown (and, under several processes, for the worker child that is stopped after them)."""
    raise_open_files_limit()
    reserve_s = 5.0 if workers == 1 else 12.0
    uvicorn.run(
        app,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        http=GuardedHttpProtocol,
        timeout_graceful_shutdown=max(int(grace_s - drain_s - reserve_s), 1),
        # Longer than common clients' idle timeout (httpx: 5 s), so the server is never the side that
        # closes a connection a client is just reusing; load balancers should idle out first too.
        timeout_keep_alive=KEEP_ALIVE_S,
        backlog=4096,
    )
