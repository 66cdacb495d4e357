"""The ledger writer's mechanism (app/core/batching.Batcher): no timer, batches form from what queued
while the previous one ran, and each caller gets its own result or failure."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core import timing
from app.core.batching import Batcher
from app.core.logging import request_id_var, tenant_id_var


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


async def test_each_batch_runs_outside_the_request_that_started_the_runner(engine: AsyncEngine) -> None:
    """Two concurrent requests: A's item starts the runner, B's queues behind it and goes in the next
    batch. Neither batch sees A's (or B's) request id or tenant, and B's batch adds its database time to
    B's Server-Timing, not to A's, which has answered by then."""
    seen: list[tuple[str | None, str | None]] = []
    gate = asyncio.Event()
    started = asyncio.Event()

    async def apply(items: list[str]) -> list[str | BaseException]:
        seen.append((request_id_var.get(), tenant_id_var.get()))
        started.set()
        if items == ["a"]:
            await gate.wait()
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(apply)

    async def request(request_id: str, item: str) -> tuple[str, timing.Spent]:
        request_id_var.set(request_id)
        tenant_id_var.set(f"ten_{request_id}")
        spent, _ = timing.start()
        return await batcher.submit(item), spent

    first = asyncio.create_task(request("req-a", "a"))
    await started.wait()
    second = asyncio.create_task(request("req-b", "b"))
    await asyncio.sleep(0)  # B queues behind A's running batch
    gate.set()
    answer_a, spent_a = await first
    a_db_when_answered = spent_a.db_s
    answer_b, spent_b = await second
    assert (answer_a, answer_b) == ("A", "B")
    assert seen == [(None, None), (None, None)]
    assert spent_b.db_s > 0  # B's own batch
    assert spent_a.db_s == a_db_when_answered > 0  # A's batch only, not B's after it


async def test_an_exit_exception_is_not_handed_to_the_callers() -> None:
    """SystemExit and KeyboardInterrupt stop the process: they propagate from the runner (run here as a
    plain coroutine: raised in a task, asyncio would stop this test's event loop with them), and the
    batch's callers are cancelled rather than handed the exit exception to swallow."""
    for exit_exception in (SystemExit(3), KeyboardInterrupt()):

        async def apply(items: list[str], exc: BaseException = exit_exception) -> list[str | BaseException]:
            raise exc

        batcher: Batcher[str, str] = Batcher(apply)
        caller: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        batcher._queue.append(("a", caller, None))
        with pytest.raises(type(exit_exception)):
            await batcher._run()
        assert caller.cancelled()


async def test_a_caller_gone_with_on_abandoned_has_its_item_applied_and_handed_over() -> None:
    """on_abandoned: the item of a caller cancelled while its batch runs, or while it still queues, is
    applied all the same and its result handed to on_abandoned (a hold to give back); a caller without
    it is dropped while queued, as before."""
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = Batcher(recorder)
    abandoned: list[str] = []
    running = asyncio.create_task(batcher.submit("a", on_abandoned=abandoned.append))
    await recorder.started.wait()
    queued = asyncio.create_task(batcher.submit("b", on_abandoned=abandoned.append))
    dropped = asyncio.create_task(batcher.submit("gone"))
    failing = asyncio.create_task(batcher.submit("bad", on_abandoned=abandoned.append))
    await asyncio.sleep(0)  # they queue
    for task in (running, queued, dropped, failing):
        task.cancel()
    recorder.gate.set()
    await asyncio.wait([running, queued, dropped, failing])
    runner = batcher._runner
    assert runner is not None
    await runner
    assert recorder.batches == [["a"], ["b", "bad"]]
    assert abandoned == ["A", "B"]  # an exception result has nothing to hand over
