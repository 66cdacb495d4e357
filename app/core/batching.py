"""Group results that arrive one by one into batches, so one transaction stores many of them."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from app.core import timing

log = logging.getLogger("vidgate.batching")
T = TypeVar("T")
R = TypeVar("R")


async def batches(
    queue: asyncio.Queue[T], *, done: Callable[[], bool], max_size: int = 500, idle_s: float = 0.2
) -> AsyncIterator[list[T]]:
    """Yield what is queued, up to `max_size` at a time, until `done()` and the queue is empty."""
    while not (done() and queue.empty()):
        try:
            first = await asyncio.wait_for(queue.get(), idle_s)
        except TimeoutError:
            continue
        batch = [first]
        while len(batch) < max_size and not queue.empty():
            batch.append(queue.get_nowait())
        yield batch


class Batcher(Generic[T, R]):
    """A writer that applies everything queued while its previous batch ran as one batch.

    Callers `await submit(item)` and get their own result (or exception). There is no timer: a lone
    item goes at once, and whatever arrives during a batch forms the next one, so batches grow with
    load and latency does not. `apply` gets the items in arrival order and returns one result per
    item: a value, or an exception for that caller alone. If `apply` itself raises an Exception, every
    caller of that batch gets it; an exit exception (SystemExit, KeyboardInterrupt, a cancelled runner)
    cancels the batch's callers and propagates, as exit exceptions must.

    A caller that goes away (its task cancelled) before its batch is taken is dropped, unless it gave
    `on_abandoned`: then its item is applied all the same and `on_abandoned` gets the result (not an
    exception), for what must not be left half done (a hold to give back, a charge to record).

    The runner belongs to no request: it runs in a context of its own, so a batch neither logs the
    request id and tenant of the caller that happened to start the runner nor adds its database time to
    that caller's `Server-Timing`. Each caller is credited with the database time of its own batch.
    """

    def __init__(
        self,
        apply: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_size: int = 256,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._apply = apply
        self._max_size = max_size
        self._observe = observe
        self._queue: list[tuple[T, asyncio.Future[R], Callable[[R], None] | None]] = []
        self._runner: asyncio.Task[None] | None = None
        # The database time of each resolved caller's batch, read back in the caller's own context.
        self._spent: dict[asyncio.Future[R], float] = {}

    async def submit(self, item: T, *, on_abandoned: Callable[[R], None] | None = None) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, on_abandoned))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), context=contextvars.Context())
        # A caller cancelled before its batch is taken is dropped (unless on_abandoned); once taken, its
        # item is applied whatever happens to the caller (the batch is one transaction).
        try:
            return await future
        finally:
            timing.add_db(self._spent.pop(future, 0.0))

    async def _run(self) -> None:
        while self._queue:
            taken, self._queue = self._queue[: self._max_size], self._queue[self._max_size :]
            live = [entry for entry in taken if not entry[1].done() or entry[2] is not None]
            if not live:
                continue
            if self._observe is not None:
                self._observe(len(live))
            spent, token = timing.start()
            try:
                results = await self._apply([item for item, _, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"a batch of {len(live)} got {len(results)} results")
            except Exception as exc:  # the batch's callers learn why; the writer keeps going
                for _, future, _ in live:
                    if not future.done():
                        self._spent[future] = spent.db_s
                        future.set_exception(exc)
                continue
            except BaseException:  # an exit exception is the process's, not the callers'
                for _, future, _ in live:
                    future.cancel()
                raise
            finally:
                timing.stop(token)
            for (_, future, on_abandoned), result in zip(live, results, strict=True):
                if future.done():
                    if on_abandoned is not None and not isinstance(result, BaseException):
                        try:
                            on_abandoned(result)
                        except Exception:  # one caller's clean-up must not stop the writer
                            log.exception("abandoned result not handled")
                    continue
                self._spent[future] = spent.db_s
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
