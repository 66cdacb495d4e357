"""Group results that arrive one by one into batches, so one transaction stores many of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

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
    item: a value, or an exception for that caller alone. If `apply` itself raises, every caller of
    that batch gets the exception.
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
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        # A caller cancelled before its batch is taken is dropped; once taken, its item is applied
        # whatever happens to the caller (the batch is one transaction).
        return await future

    async def _run(self) -> None:
        while self._queue:
            taken, self._queue = self._queue[: self._max_size], self._queue[self._max_size :]
            live = [(item, future) for item, future in taken if not future.done()]
            if not live:
                continue
            if self._observe is not None:
                self._observe(len(live))
            try:
                results = await self._apply([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"a batch of {len(live)} got {len(results)} results")
            except BaseException as exc:  # the batch's callers learn why; the writer keeps going
                for _, future in live:
                    if future.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), result in zip(live, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
