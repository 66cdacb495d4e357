"""The ledger writer's mechanism (app/core/batching.Batcher): no timer, batches form from what queued
while the previous one ran, and each caller gets its own result or failure."""

from __future__ import annotations

import asyncio

import pytest

from app.core.batching import Batcher


class Recorder:
    """An apply function that records its batches and can be held open until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.fail_when: str | None = None

    async def __call__(self, items: list[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_when in items:
            raise RuntimeError(f"batch with {self.fail_when} failed")
        return [ValueError(item) if item.startswith("bad") else item.upper() for item in items]


async def test_a_lone_request_goes_at_once() -> None:
    recorder = Recorder()
    sizes: list[int] = []
    batcher = Batcher(recorder, observe=sizes.append)
    assert await batcher.submit("a") == "A"
    assert recorder.batches == [["a"]]
    assert sizes == [1]


async def test_what_queues_during_a_batch_forms_the_next_one() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = Batcher(recorder)
    first = asyncio.create_task(batcher.submit("a"))
    await recorder.started.wait()
    later = [asyncio.create_task(batcher.submit(item)) for item in ("b", "c", "d")]
    await asyncio.sleep(0)  # let them queue
    recorder.gate.set()
    assert await asyncio.gather(first, *later) == ["A", "B", "C", "D"]
    assert recorder.batches == [["a"], ["b", "c", "d"]]


async def test_max_size_splits_a_long_queue_in_arrival_order() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = Batcher(recorder, max_size=2)
    first = asyncio.create_task(batcher.submit("a"))
    await recorder.started.wait()
    later = [asyncio.create_task(batcher.submit(item)) for item in ("b", "c", "d", "e", "f")]
    await asyncio.sleep(0)
    recorder.gate.set()
    await asyncio.gather(first, *later)
    assert recorder.batches == [["a"], ["b", "c"], ["d", "e"], ["f"]]


async def test_a_failing_batch_fails_exactly_its_callers() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    recorder.fail_when = "x"
    batcher = Batcher(recorder, max_size=2)
    first = asyncio.create_task(batcher.submit("a"))
    await recorder.started.wait()
    doomed = [asyncio.create_task(batcher.submit(item)) for item in ("b", "x")]
    after = asyncio.create_task(batcher.submit("c"))
    await asyncio.sleep(0)
    recorder.gate.set()
    assert await first == "A"
    for task in doomed:
        with pytest.raises(RuntimeError, match="batch with x failed"):
            await task
    assert await after == "C"  # the writer goes on after a failed batch
    assert recorder.batches == [["a"], ["b", "x"], ["c"]]


async def test_an_item_refused_alone_fails_only_its_caller() -> None:
    batcher = Batcher(Recorder())
    results = await asyncio.gather(
        batcher.submit("a"), batcher.submit("bad"), batcher.submit("b"), return_exceptions=True
    )
    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], ValueError)


async def test_a_caller_cancelled_while_queued_is_dropped_and_one_cancelled_in_a_batch_is_applied() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = Batcher(recorder)
    running = asyncio.create_task(batcher.submit("a"))
    await recorder.started.wait()
    queued = asyncio.create_task(batcher.submit("gone"))
    kept = asyncio.create_task(batcher.submit("b"))
    await asyncio.sleep(0)
    queued.cancel()
    running.cancel()  # its batch is already running: it still completes, for the record
    recorder.gate.set()
    assert await kept == "B"
    with pytest.raises(asyncio.CancelledError):
        await running
    assert recorder.batches == [["a"], ["b"]]


async def test_a_wrong_number_of_results_fails_the_batch_instead_of_hanging() -> None:
    async def short(items: list[str]) -> list[str | BaseException]:
        return items[:-1]

    batcher: Batcher[str, str] = Batcher(short)
    with pytest.raises(RuntimeError, match="got 0 results"):
        await batcher.submit("a")
