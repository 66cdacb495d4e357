"""The background side of a process: the poller, the webhook dispatcher, the output copier, the fair
queue's dispatcher (app/queue) and housekeeping.

Everything it works on is a database row with a due time and a lease, so `vidgate serve` (embedded)
and any number of `vidgate worker` processes share the work, and a killed one loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import service as budgets_service
from app.core import clock, metrics
from app.core.database import outage_backoff_s, transaction
from app.core.errors import DatabaseUnavailable
from app.outputs import service as outputs_service
from app.outputs.copier import Copier
from app.predictions import poller
from app.predictions import service as predictions_service
from app.predictions.models import IdempotencyKey, Prediction, PredictionStatus
from app.providers import stats as provider_stats
from app.queue import service as queue_service
from app.queue.dispatcher import QueueDispatcher
from app.runtime import Runtime
from app.webhooks.dispatcher import Dispatcher

log = logging.getLogger("vidgate.worker")

IDLE_POLL_S = 0.1  # with nothing due: how long a row that comes due may wait for its claim
IDLE_DISPATCH_S = 0.1
IDLE_QUEUE_S = 0.1  # a provider's room freed elsewhere waits this long for a queued prediction
IDLE_COPY_S = 0.1  # a copy waits for its claim like a poll: part of the notification lag
HOUSEKEEPING_S = 10.0
RETENTION_SWEEP_S = 300.0
SHUTDOWN_GRACE_S = 10.0


class Worker:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stopping = asyncio.Event()
        self.dispatcher = Dispatcher(runtime)
        self.copier = Copier(runtime, finish=self._finish_copied, events_queued=self.dispatcher.wake)
        # Each stage wakes the next when it queues work for it, so a burst flows through at the speed
        # of the work, not of the idle ticks; the ticks remain for rows queued by other processes.
        self.poller = poller.Poller(runtime, copies_queued=self.copier.wake, events_queued=self.dispatcher.wake)
        self.queue = QueueDispatcher(runtime)

    async def _finish_copied(self, session: AsyncSession, results: list[outputs_service.CopyResult]) -> set[str]:
        """The copier's endings go through the one terminal transition: slots, charge policy, webhooks."""
        done = await predictions_service.finish_many(
            session,
            self.runtime,
            [
                predictions_service.Finish(
                    r.prediction_id,
                    PredictionStatus(r.status),
                    outputs=r.outputs,
                    error=r.error,
                    completed_at=r.completed_at,
                    model_name=r.model_name,
                )
                for r in results
            ],
            lease_owner=None,
        )
        return set(done)

    async def run(self) -> None:
        log.info("worker started", extra={"worker_id": self.runtime.worker_id})
        writer = asyncio.create_task(self.poller.write_loop(self.stopping))
        recorder = asyncio.create_task(self.dispatcher.write_loop(self.stopping))
        copies = asyncio.create_task(self.copier.write_loop(self.stopping))
        # The polls' tallies per provider (the dashboard's figures); serve's lifespan runs its own.
        tallies = asyncio.create_task(provider_stats.flush_loop(self.runtime.sessions, self.stopping))
        await asyncio.gather(
            self._loop(self.poller.run_once, IDLE_POLL_S, self.poller.room),
            self._loop(self.dispatcher.run_once, IDLE_DISPATCH_S, self.dispatcher.room),
            self._loop(self.copier.run_once, IDLE_COPY_S, self.copier.room),
            self._loop(self.queue.run_once, IDLE_QUEUE_S, self.queue.room),
            self._loop(self.sweep_outputs, RETENTION_SWEEP_S, always_sleep=True),
            self._loop(self.housekeeping, HOUSEKEEPING_S, always_sleep=True),
        )
        await self._drain(writer, recorder, copies)
        with contextlib.suppress(Exception):
            await tallies

    def stop(self) -> None:
        self.stopping.set()

    async def _loop(
        self,
        step: Callable[[], Awaitable[int]],
        idle_s: float,
        room: asyncio.Event | None = None,
        always_sleep: bool = False,
    ) -> None:
        """Run `step` until stopped. When it found nothing to start, wait `idle_s` for new due rows,
        or less: `room` is set the moment work in flight ends, so a full pipeline refills at once."""
        failures = 0
        while not self.stopping.is_set():
            if room is not None:
                room.clear()
            try:
                done = await step()
            except Exception as exc:
                # Back off and keep going: the work is rows in the database, nothing is lost. An outage
                # is expected weather (a warning); anything else is a bug and said loudly.
                failures += 1
                report = log.warning if isinstance(exc, DatabaseUnavailable) else log.error
                report(
                    "worker step failed",
                    extra={
                        "step": getattr(step, "__name__", "step"),
                        "error_type": type(exc).__name__,
                        "failures": failures,
                    },
                )
                await self._pause(outage_backoff_s(failures), None)
                continue
            failures = 0
            if done == 0 or always_sleep:
                await self._pause(idle_s, room)

    async def _pause(self, seconds: float, room: asyncio.Event | None) -> None:
        waits = [asyncio.ensure_future(self.stopping.wait())]
        if room is not None:
            waits.append(asyncio.ensure_future(room.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def _drain(
        self, writer: asyncio.Task[None], recorder: asyncio.Task[None], copies: asyncio.Task[None]
    ) -> None:
        """Graceful stop: let in-flight polls and deliveries finish and be stored, then hand back every
        lease still held, so other processes need not wait for it to expire."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_S

        def left() -> float:
            return max(deadline - loop.time(), 0.5)

        deliveries = set(self.dispatcher.tasks)
        await self.queue.drain(left())
        await self.poller.drain(left())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, left())
        if deliveries:
            _, still_running = await asyncio.wait(deliveries, timeout=left())
            for task in still_running:
                task.cancel()
            await asyncio.gather(*still_running, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(recorder, left())
        # A copy in progress is not waited for (it may be gigabytes): its lease is handed back and
        # another process starts that output again. Copies that ended are written first.
        await self.copier.drain(0.1)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(copies, left())
        with contextlib.suppress(Exception):
            await poller.release_leases(self.runtime)
            await self.dispatcher.release_leases()
            await self.copier.release_leases()
        await self.copier.close()
        log.info("worker stopped", extra={"worker_id": self.runtime.worker_id})

    async def sweep_outputs(self) -> int:
        """Retention: stored outputs past their tenant's days are deleted."""
        assert self.copier.store is not None
        return await outputs_service.sweep(self.runtime.sessions, self.runtime.settings, self.copier.store)

    async def housekeeping(self) -> int:
        await predictions_service.recover_interrupted_submits(self.runtime)
        now = clock.now()
        async with transaction(self.runtime.sessions) as session:
            await session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < now))
            in_flight = await session.scalar(
                select(func.count()).select_from(Prediction).where(Prediction.status == PredictionStatus.PROCESSING)
            )
            balances = await budgets_service.current_balances(session)
            depths = await queue_service.depths(session)
        metrics.IN_FLIGHT.set(in_flight or 0)
        for tenant_id, depth in depths.items():
            metrics.QUEUE_DEPTH.labels(tenant=tenant_id).set(depth)
        for tenant_id, (spent, reserved) in balances.items():
            metrics.SPENT_CENTS.labels(tenant=tenant_id).set(spent)
            metrics.RESERVED_CENTS.labels(tenant=tenant_id).set(reserved)
        return 0
