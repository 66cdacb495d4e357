"""A process's stages of life as requests see them (SPEC §6): serving, draining, stopping; and admission.

- Draining: SIGTERM came. `/readyz` answers 503 so a load balancer takes the process out, while requests
  are still served (with `Connection: close`, so clients that keep connections open come back through
  the balancer to another replica) for VIDGATE_SHUTDOWN_DRAIN_S.
- Stopping: the drain is over; the server accepts nothing new and waits for the requests in flight.
  What waits on its own account (`Prefer: wait`) answers with what it has instead of holding the stop.
- Admission: at most VIDGATE_MAX_INFLIGHT_REQUESTS API requests in flight per process; beyond that,
  `503 overloaded` at once, before any work. A request that waits for a connection of an exhausted pool
  is slower for everyone behind it; one refused at once costs nothing and is retried elsewhere or later.
  Counted, not timed: a limit on time would shed only after the harm (queues) is done.

The stage belongs to the process (the signal does), hence module state: `drain_on_sigterm` (entered by the
app's lifespan, in whichever server process runs it) moves it on; the middleware and the routes read it.
It puts itself in front of the server's own SIGTERM handler and hands the signal on when the drain is
over, so the server (uvicorn, one process or several) then stops as it always does: no new connections,
the requests in flight finished (bounded by its graceful-shutdown timeout), then the lifespan's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

from app.core.errors import AppError

log = logging.getLogger("vidgate.lifecycle")

# Never refused, never counted: how the process is watched must keep working while it is full.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER_S = 1


class _Stage:
    draining_since: float | None = None
    stopping: bool = False


_stage = _Stage()


def begin_drain() -> None:
    """SIGTERM: from now on /readyz answers 503. Safe from a signal handler (it only sets fields)."""
    if _stage.draining_since is None:
        _stage.draining_since = time.monotonic()


def begin_stop() -> None:
    begin_drain()
    _stage.stopping = True


def draining() -> bool:
    return _stage.draining_since is not None


def stopping() -> bool:
    return _stage.stopping


def reset() -> None:
    """Back to serving (tests that run several servers in one process)."""
    _stage.draining_since = None
    _stage.stopping = False


_at_drain: list[Callable[[], None]] = []


def at_drain(callback: Callable[[], None]) -> None:
    """Run `callback` (on the event loop) when the drain begins: background work (the worker, its child
    process) stops taking new rows then and hands its leases back while requests are still served."""
    _at_drain.append(callback)


# Allocations of container objects between two collections of the youngest generation (CPython's default
# is 700). Each collection walks every young object still alive, and under load those are the requests in
# flight: at 700, a collection ran every submit or two and walked the same in-flight state again and again.
# At 20,000 the gateway's CPU per submit at 32 concurrent fell by about 5 % (interleaved quick runs,
# bench/FINDINGS.md, issue 25); the objects waiting for a collection are a few megabytes at most.
YOUNG_GENERATION_THRESHOLD = 20_000


def ready_heap() -> None:
    """Called once startup is done. What was loaded so far lives as long as the process: it is moved out of
    the collector's sight (gc.freeze), so full collections walk only what requests allocate; and the youngest
    generation is collected less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


@contextlib.contextmanager
def drain_on_sigterm(drain_s: float, on_drain: list[Callable[[], None]]) -> Iterator[None]:
    """While entered: the first SIGTERM begins the drain; after `drain_s` (or at a second SIGTERM) the signal
    goes on to the handler that was there before (the server's). Entered on the event loop's thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread's handlers: nothing to put in front of
        return
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # None: set outside Python; the default
    handed_on = False
    tasks: set[asyncio.Task[None]] = set()

    def hand_on() -> None:
        nonlocal handed_on
        if handed_on:
            return
        handed_on = True
        begin_stop()
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)

    async def drain() -> None:
        log.warning("SIGTERM: draining", extra={"drain_s": drain_s})
        for callback in (*_at_drain, *on_drain):
            try:
                callback()
            except Exception as exc:  # one that fails must not keep the process from stopping
                log.error("drain callback failed", extra={"error_type": type(exc).__name__})
        await asyncio.sleep(drain_s)
        hand_on()

    def start_drain() -> None:
        task = loop.create_task(drain())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def handler(_sig: int, _frame: FrameType | None) -> None:
        if draining():
            loop.call_soon_threadsafe(hand_on)  # asked again: stop now
            return
        begin_drain()
        loop.call_soon_threadsafe(start_drain)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        if not handed_on and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)


class Overloaded(AppError):
    status = 503
    code = "overloaded"
    title = "Too many requests in flight"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This gateway process has {limit} requests in flight, its limit; retry in {RETRY_AFTER_S} s.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
            limit=limit,
        )


class Admission:
    """The count of API requests in flight in one app, against its limit. One event loop: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.shed = 0  # refused since start (a metric counts them too)

    def enter(self) -> bool:
        if self.inflight >= self.limit:
            self.shed += 1
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1
