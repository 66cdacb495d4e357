"""Polls the upstream for every in-flight prediction. The queue is the predictions table itself:
`next_poll_at` says when, a lease says who, so any process can take over a dead one's work.

Claims are batched, upstream calls run concurrently on the shared keep-alive pool, and results are
written back in batches: one transaction stores many polls, which is what keeps thousands of
predictions in flight affordable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core import clock, metrics
from app.core.batching import batches
from app.core.database import store_until_done, transaction
from app.outputs import service as outputs_service
from app.predictions import service as predictions_service
from app.predictions.models import TERMINAL_STATUSES, Prediction, PredictionStatus
from app.providers.adapters import UnknownProvider
from app.runtime import Runtime
from app.upstream.client import UpstreamRefused, UpstreamUnavailable
from app.upstream.schemas import UpstreamPrediction

log = logging.getLogger("vidgate.poller")

MAX_BACKOFF_S = 30.0
WRITE_BATCH = 500


@dataclass(frozen=True)
class Outcome:
    prediction: Prediction
    seen: UpstreamPrediction | None = None  # None: the call failed, back off
    retry_after_s: float | None = None
    expired: bool = False


async def claim_due(runtime: Runtime, limit: int) -> list[Prediction]:
    """Lease up to `limit` due predictions. SKIP LOCKED lets replicas claim side by side on PostgreSQL;
    on SQLite the statement runs alone under the write lock."""
    now = clock.now()
    due = (
        select(Prediction.id)
        .where(
            Prediction.next_poll_at <= now,
            Prediction.status == PredictionStatus.PROCESSING,
            (Prediction.lease_expires_at.is_(None)) | (Prediction.lease_expires_at < now),
        )
        .order_by(Prediction.next_poll_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    async with transaction(runtime.sessions) as session:
        rows = await session.scalars(
            update(Prediction)
            .where(Prediction.id.in_(due.scalar_subquery()))
            .values(
                lease_owner=runtime.worker_id,
                lease_expires_at=now + timedelta(seconds=runtime.settings.lease_s),
            )
            .returning(Prediction)
            .execution_options(synchronize_session=False)
        )
        return list(rows)


async def release_leases(runtime: Runtime) -> None:
    """On shutdown: hand our leased rows back at once instead of making others wait out the lease."""
    async with transaction(runtime.sessions) as session:
        await session.execute(
            update(Prediction)
            .where(Prediction.lease_owner == runtime.worker_id)
            .values(lease_owner=None, lease_expires_at=None)
        )


def _nothing() -> None:
    pass


class Poller:
    def __init__(
        self,
        runtime: Runtime,
        *,
        copies_queued: Callable[[], None] = _nothing,
        events_queued: Callable[[], None] = _nothing,
    ) -> None:
        self.runtime = runtime
        # Called once a write that queued copy jobs, or ended predictions with their webhooks, has
        # committed: the worker wakes the copier or the dispatcher then, instead of leaving the rows to
        # their next idle tick (part of the notification lag, at every step of a burst).
        self.copies_queued = copies_queued
        self.events_queued = events_queued
        self.tasks: set[asyncio.Task[None]] = set()
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.unwritten = 0  # claimed rows whose result is not stored yet: bounds the work in flight
        self.room = asyncio.Event()  # set when stored results free room in a full pipeline

    async def run_once(self) -> int:
        settings = self.runtime.settings
        free = settings.worker_concurrency - self.unwritten
        if free <= 0:
            return 0
        claimed = await claim_due(self.runtime, min(free, settings.poll_batch_size))
        self.unwritten += len(claimed)
        for prediction in claimed:
            task = asyncio.create_task(self._fetch(prediction))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return len(claimed)

    async def _fetch(self, prediction: Prediction) -> None:
        now = clock.now()
        if prediction.next_poll_at is not None:
            metrics.POLL_LAG.observe(max((now - prediction.next_poll_at).total_seconds(), 0.0))
        if (now - prediction.created_at).total_seconds() > self.runtime.settings.prediction_max_age_s:
            self.outcomes.put_nowait(Outcome(prediction, expired=True))
            return
        try:
            # Only at the provider that accepted it, through its adapter (polls never move).
            adapter = self.runtime.providers.adapter(prediction.provider)
            seen = await adapter.get_prediction(prediction.upstream_id or "", prediction.upstream_ref)
        except UnknownProvider as exc:
            log.error("poll impossible", extra={"prediction_id": prediction.id, "reason": str(exc)})
            self.outcomes.put_nowait(Outcome(prediction))
            return
        except (UpstreamUnavailable, UpstreamRefused) as exc:
            kind = "refused" if isinstance(exc, UpstreamRefused) else "unavailable"
            metrics.UPSTREAM_ERRORS.labels(provider=prediction.provider or "", op="poll", kind=kind).inc()
            retry_after = exc.retry_after_s if isinstance(exc, UpstreamUnavailable) else None
            self.outcomes.put_nowait(Outcome(prediction, retry_after_s=retry_after))
            return
        except Exception as exc:
            log.error("poll failed", extra={"prediction_id": prediction.id, "error_type": type(exc).__name__})
            self.outcomes.put_nowait(Outcome(prediction))
            return
        self.outcomes.put_nowait(Outcome(prediction, seen=seen))

    async def write_loop(self, stopping: asyncio.Event) -> None:
        """Store results as they arrive, many per transaction. Runs until stopped and drained."""

        def done() -> bool:
            return stopping.is_set() and not self.tasks

        async for batch in batches(self.outcomes, done=done, max_size=WRITE_BATCH):
            try:
                # Waits out a database outage; if it fails otherwise, the leases expire and the rows
                # are polled again: nothing is lost.
                await store_until_done(functools.partial(self.write, batch), "poll results")
            finally:
                was_full = self.unwritten >= self.runtime.settings.worker_concurrency
                self.unwritten -= len(batch)
                if was_full:
                    self.room.set()

    async def write(self, batch: list[Outcome]) -> None:
        runtime = self.runtime
        owner = runtime.worker_id
        now = clock.now()
        interval = runtime.settings.poll_interval_s
        still = [o.prediction.id for o in batch if o.seen is not None and o.seen.status not in TERMINAL_STATUSES]
        failed = [o for o in batch if o.seen is None and not o.expired]
        ended = [o for o in batch if o.expired or (o.seen is not None and o.seen.status in TERMINAL_STATUSES)]
        queued: set[str] = set()
        finished = False
        async with transaction(runtime.sessions) as session:
            if still:
                # Fenced on the lease: a worker that lost its lease writes nothing.
                await session.execute(
                    update(Prediction)
                    .where(
                        Prediction.id.in_(still),
                        Prediction.lease_owner == owner,
                        Prediction.status == PredictionStatus.PROCESSING,
                    )
                    .values(
                        next_poll_at=now + timedelta(seconds=interval),
                        poll_count=Prediction.poll_count + 1,
                        poll_failures=0,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                    .execution_options(synchronize_session=False)
                )
            if failed:
                table: Any = Prediction.__table__
                await session.execute(
                    update(table)
                    .where(
                        table.c.id == bindparam("pid"),
                        table.c.lease_owner == owner,
                        table.c.status == PredictionStatus.PROCESSING,
                    )
                    .values(
                        next_poll_at=bindparam("due"),
                        poll_failures=table.c.poll_failures + 1,
                        poll_count=table.c.poll_count + 1,
                        lease_owner=None,
                        lease_expires_at=None,
                    ),
                    [{"pid": o.prediction.id, "due": now + timedelta(seconds=self._backoff_s(o))} for o in failed],
                )
            if ended:
                # Split the batch: completed outputs are copied first (SPEC section 8), the rest end now.
                finals = [(o, self._final(o)) for o in ended]
                copies = [(o, f) for o, f in finals if self._rehosted(o, f)]
                if copies:
                    queued = await self._enqueue_copies(session, copies)
                copied = {o.prediction.id for o, _ in copies}
                # One batch of terminal transitions: fenced on our lease, with their webhook deliveries.
                finished = bool(
                    await predictions_service.finish_many(
                        session, runtime, [f for _, f in finals if f.prediction_id not in copied], lease_owner=owner
                    )
                )
        # Committed: the next stage need not wait for its idle tick to see these rows.
        if queued:
            self.copies_queued()
        if finished:
            self.events_queued()

    def _rehosted(self, outcome: Outcome, final: predictions_service.Finish) -> bool:
        """Completed with outputs and VIDGATE_REHOST_OUTPUTS on: copied first, finished by the copier.
        A row from before links had a base, with no VIDGATE_PUBLIC_BASE_URL either, passes through."""
        settings = self.runtime.settings
        return (
            final.status == PredictionStatus.COMPLETED
            and bool(final.outputs)
            and outputs_service.rehosting(settings)
            and bool(settings.public_base_url or outcome.prediction.public_base_url)
        )

    async def _enqueue_copies(
        self, session: AsyncSession, copies: list[tuple[Outcome, predictions_service.Finish]]
    ) -> set[str]:
        """The prediction stays `processing` for the caller, no longer due for polling (fenced on our
        lease), and its copy job is queued in the same transaction: the webhook waits for the copy."""
        kept = set(
            await session.scalars(
                update(Prediction)
                .where(
                    Prediction.id.in_([o.prediction.id for o, _ in copies]),
                    Prediction.lease_owner == self.runtime.worker_id,
                    Prediction.status == PredictionStatus.PROCESSING,
                )
                .values(
                    next_poll_at=None, poll_count=Prediction.poll_count + 1, lease_owner=None, lease_expires_at=None
                )
                .returning(Prediction.id)
                .execution_options(synchronize_session=False)
            )
        )
        # One multi-row INSERT for the batch, not a round trip per job: this transaction holds the
        # poller's write slot, and a burst of completions is many jobs at once.
        return await outputs_service.enqueue_copies(
            session,
            self.runtime.settings,
            [
                outputs_service.CopyJob(
                    prediction_id=outcome.prediction.id,
                    tenant_id=outcome.prediction.tenant_id,
                    sources=final.outputs or [],
                    vendor_completed_at=final.completed_at,
                    model_name=final.model_name,
                    base_url=outcome.prediction.public_base_url,
                    provider=outcome.prediction.provider,
                )
                for outcome, final in copies
                if outcome.prediction.id in kept  # else our lease was taken over: the new owner polls it again
            ],
        )

    def _backoff_s(self, outcome: Outcome) -> float:
        failures = outcome.prediction.poll_failures + 1
        delay = min(self.runtime.settings.poll_interval_s * 2 ** (failures - 1), MAX_BACKOFF_S)
        return float(max(delay, outcome.retry_after_s or 0.0) * random.uniform(0.9, 1.1))

    def _final(self, outcome: Outcome) -> predictions_service.Finish:
        prediction = outcome.prediction
        if outcome.expired:
            max_age = int(self.runtime.settings.prediction_max_age_s)
            return predictions_service.Finish(
                prediction.id,
                PredictionStatus.FAILED,
                outputs=None,
                error=f"vidgate gave up: the upstream reported no final status within {max_age} s",
                completed_at=None,
            )
        assert outcome.seen is not None
        return predictions_service.final_state(prediction.id, outcome.seen, poll_count=prediction.poll_count + 1)

    async def drain(self, timeout_s: float) -> None:
        """Graceful stop: let in-flight calls finish (their results are still written), then give up."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*pending, return_exceptions=True)
