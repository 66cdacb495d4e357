"""Group results that arrive one by one into batches, so one transaction stores many of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


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
