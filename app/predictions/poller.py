"""Polls the upstream for every in-flight prediction. The queue is the predictions table itself:
`next_poll_at` says when, a lease says who, so any process can take over a dead one's work."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import timedelta

from sqlalchemy import select, update

from app.core import clock, metrics
from app.core.database import transaction
from app.predictions import service as predictions_service
from app.predictions.models import Prediction
from app.runtime import Runtime
from app.upstream.client import UpstreamRefused, UpstreamUnavailable

log = logging.getLogger("vidgate.poller")

MAX_BACKOFF_S = 30.0


async def claim_due(runtime: Runtime, limit: int) -> list[Prediction]:
    """Lease up to `limit` due predictions. SKIP LOCKED lets replicas claim side by side on PostgreSQL;
    on SQLite the statement runs alone under the write lock."""
    now = clock.now()
    due = (
        select(Prediction.id)
        .where(
            Prediction.next_poll_at <= now,
            Prediction.status == "processing",
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


async def poll_one(runtime: Runtime, prediction: Prediction) -> None:
    settings = runtime.settings
    owner = runtime.worker_id
    now = clock.now()
    if prediction.next_poll_at is not None:
        metrics.POLL_LAG.observe(max((now - prediction.next_poll_at).total_seconds(), 0.0))
    age = (now - prediction.created_at).total_seconds()
    if age > settings.prediction_max_age_s:
        async with transaction(runtime.sessions) as session:
            await predictions_service.finish(
                session,
                runtime,
                prediction.id,
                lease_owner=owner,
                status="failed",
                outputs=None,
                error=(
                    f"vidgate gave up: the upstream reported no final status within "
                    f"{int(settings.prediction_max_age_s)} s"
                ),
                completed_at=None,
            )
        return

    prediction.poll_count += 1
    try:
        seen = await runtime.upstream.get_prediction(prediction.upstream_id or "")
    except (UpstreamUnavailable, UpstreamRefused) as exc:
        kind = "refused" if isinstance(exc, UpstreamRefused) else "unavailable"
        metrics.UPSTREAM_ERRORS.labels(op="poll", kind=kind).inc()
        retry_after = exc.retry_after_s if isinstance(exc, UpstreamUnavailable) else None
        await _back_off(runtime, prediction, retry_after)
        return
    async with transaction(runtime.sessions) as session:
        if not await predictions_service.apply_poll_result(session, runtime, prediction, seen, owner):
            log.info("lease lost before the poll result was stored", extra={"prediction_id": prediction.id})


async def _back_off(runtime: Runtime, prediction: Prediction, retry_after_s: float | None) -> None:
    failures = prediction.poll_failures + 1
    delay = min(runtime.settings.poll_interval_s * 2 ** (failures - 1), MAX_BACKOFF_S)
    delay = max(delay, retry_after_s or 0.0) * random.uniform(0.9, 1.1)
    async with transaction(runtime.sessions) as session:
        await session.execute(
            update(Prediction)
            .where(Prediction.id == prediction.id, Prediction.lease_owner == runtime.worker_id)
            .values(
                next_poll_at=clock.now() + timedelta(seconds=delay),
                poll_failures=failures,
                poll_count=prediction.poll_count,
                lease_owner=None,
                lease_expires_at=None,
            )
        )


async def release_leases(runtime: Runtime) -> None:
    """On shutdown: hand our leased rows back at once instead of making others wait out the lease."""
    async with transaction(runtime.sessions) as session:
        await session.execute(
            update(Prediction)
            .where(Prediction.lease_owner == runtime.worker_id)
            .values(lease_owner=None, lease_expires_at=None)
        )


async def run_once(runtime: Runtime, semaphore: asyncio.Semaphore, tasks: set[asyncio.Task[None]]) -> int:
    free = runtime.settings.worker_concurrency - len(tasks)
    if free <= 0:
        return 0
    claimed = await claim_due(runtime, min(free, runtime.settings.poll_batch_size))
    for prediction in claimed:
        task = asyncio.create_task(_guarded(runtime, semaphore, prediction))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return len(claimed)


async def _guarded(runtime: Runtime, semaphore: asyncio.Semaphore, prediction: Prediction) -> None:
    async with semaphore:
        try:
            await poll_one(runtime, prediction)
        except Exception as exc:
            # The lease expires and another pass (here or elsewhere) retries; never lose the row.
            log.error("poll failed", extra={"prediction_id": prediction.id, "error_type": type(exc).__name__})
