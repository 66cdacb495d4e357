"""The fair queue (SPEC §12): a held prediction no provider can take now waits here, durably.

- enqueue: the prediction (already held, app/budgets via the submit's hold) becomes "queued", its
  entry is written and its tenant's depth counted, in one transaction; a tenant at its `maxQueued`
  is refused with 429 `queue_full` (the submit then releases the hold).
- fail_entries: the one way a waiting prediction ends without being sent (max wait, a refusal at
  dispatch, a dispatch whose outcome is unknown): failed, its hold and slots given back, its webhook
  written, in the caller's transaction.
- Fair share is stride scheduling on queue_tenants: the tenant with the lowest pass sends next and its
  pass grows by STRIDE / queueWeight; a tenant that starts waiting joins at the lowest pass of those
  already waiting, so a backlog never delays it by more than one round (app/queue/dispatcher.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.core import clock, metrics
from app.core.database import insert_ignore, table_of, transaction
from app.core.errors import AppError
from app.predictions import service as predictions_service
from app.predictions.models import WAITING_STATUSES, IdempotencyKey, Prediction, PredictionStatus
from app.providers import health as provider_health
from app.queue.models import QueueEntry, QueueState, QueueTenant
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.webhooks import service as webhooks_service

log = logging.getLogger("vidgate.queue")

STRIDE = 1_000_000  # a tenant's pass grows by STRIDE // queueWeight per prediction sent
WAITING_TTL_S = 1.0  # how long a process trusts its last look at whether a model has predictions waiting


class QueueFull(AppError):
    status = 429
    code = "queue_full"
    title = "Too many predictions waiting for this tenant"


_entries = table_of(QueueEntry).c
_tenants = table_of(QueueTenant).c

# Joins at the lowest pass among the tenants waiting (never below its own): no credit for idle time.
_JOIN = (
    update(table_of(QueueTenant))
    .where(_tenants.tenant_id == bindparam("b_tenant"), _tenants.depth < bindparam("b_max"))
    .values(
        depth=_tenants.depth + 1,
        pass_=case((_tenants.depth > 0, _tenants.pass_), else_=bindparam("b_floor", type_=BigInteger)),
    )
    .returning(_tenants.tenant_id)
)


def _position_statement() -> Any:
    mine = table_of(QueueEntry).alias("mine")
    others = table_of(QueueEntry).alias("others")
    return (
        select(func.count())
        .select_from(mine)
        .join(
            others,
            and_(
                others.c.tenant_id == mine.c.tenant_id,
                others.c.state == QueueState.QUEUED,
                or_(
                    others.c.enqueued_at < mine.c.enqueued_at,
                    and_(others.c.enqueued_at == mine.c.enqueued_at, others.c.prediction_id <= mine.c.prediction_id),
                ),
            ),
        )
        .where(
            mine.c.prediction_id == bindparam("b_id"),
            mine.c.tenant_id == bindparam("b_tenant"),
            mine.c.state == QueueState.QUEUED,
        )
    )


_POSITION = _position_statement()


async def _floor_pass(session: AsyncSession, tenant_id: str) -> int:
    """The pass a tenant starts waiting at: the lowest among those waiting, or its own if higher."""
    lowest = await session.scalar(select(func.min(_tenants.pass_)).where(_tenants.depth > 0))
    own = await session.scalar(select(_tenants.pass_).where(_tenants.tenant_id == tenant_id))
    return max(int(lowest or 0), int(own or 0))


async def enqueue(
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    prediction: Prediction,
    *,
    reason: str,
    idempotency_key: str | None,
    status_url_base: str,
) -> predictions_service.SubmitResult:
    """The held prediction waits: "queued", its entry and its tenant's depth in one transaction. Raises
    QueueFull (nothing written) at the tenant's maxQueued; the caller then releases the hold."""
    now = clock.now()
    params = prediction.params
    async with transaction(runtime.sessions) as session:
        await insert_ignore(session, QueueTenant, [{"tenant_id": tenant.id, "depth": 0, "pass_": 0}])
        floor = await _floor_pass(session, tenant.id)
        joined = await session.scalar(_JOIN, {"b_tenant": tenant.id, "b_max": tenant.max_queued, "b_floor": floor})
        if joined is None:
            metrics.BUDGET_REFUSALS.labels(code=QueueFull.code).inc()
            raise QueueFull(
                f"This tenant already has {tenant.max_queued} predictions waiting for a provider (its maxQueued). "
                "Nothing was charged; retry when some have been sent.",
                maxQueued=tenant.max_queued,
            )
        moved = await session.scalar(
            update(Prediction)
            .where(Prediction.id == prediction.id, Prediction.status == PredictionStatus.SUBMITTING)
            .values(status=PredictionStatus.QUEUED, provider=None, holds_provider_slot=False)
            .returning(Prediction.id)
            .execution_options(synchronize_session=False)
        )
        if moved is None:
            raise RuntimeError(f"prediction {prediction.id} is no longer submitting")
        session.add(
            QueueEntry(
                prediction_id=prediction.id,
                tenant_id=tenant.id,
                model_id=prediction.model_id,
                resolution=str(params.get("resolution", budgets_service.DEFAULT_RESOLUTION)),
                duration=int(params.get("duration", budgets_service.DEFAULT_DURATION_S)),
                state=QueueState.QUEUED,
                enqueued_at=now,
                attempts=0,
            )
        )
        prediction.status, prediction.provider, prediction.holds_provider_slot = PredictionStatus.QUEUED, None, False
        body = predictions_service.present_submit(prediction, f"{status_url_base}/{prediction.id}", extended=False)
        if idempotency_key is not None:
            await session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.tenant_id == tenant.id, IdempotencyKey.key == idempotency_key)
                .values(response=body)
            )
    log.info(
        "prediction queued: no provider can take it now",
        extra={"prediction_id": prediction.id, "tenant_id": tenant.id, "reason": reason[:300]},
    )
    return predictions_service.SubmitResult(body=body, replayed=False, prediction_id=prediction.id)


async def any_waiting(runtime: Runtime, model_id: str) -> bool:
    async with transaction(runtime.sessions, readonly=True) as session:
        found = await session.scalar(
            select(_entries.prediction_id)
            .where(_entries.model_id == model_id, _entries.state == QueueState.QUEUED)
            .limit(1)
        )
    return found is not None


async def anything_queued(runtime: Runtime) -> bool:
    async with transaction(runtime.sessions, readonly=True) as session:
        found = await session.scalar(select(_tenants.tenant_id).where(_tenants.depth > 0).limit(1))
    return found is not None


async def position(connection: AsyncConnection | AsyncSession, tenant_id: str, prediction_id: str) -> int | None:
    count = await connection.scalar(_POSITION, {"b_id": prediction_id, "b_tenant": tenant_id})
    return int(count) if count else None


@dataclass
class Hook:
    """The queue as app/predictions sees it (app/runtime.QueueHook); one per runtime, so its look at
    whether a model has predictions waiting is that process's."""

    _waiting: dict[str, tuple[float, bool]]

    def __init__(self) -> None:
        self._waiting = {}

    async def waiting(self, runtime: Runtime, model_id: str) -> bool:
        # One indexed probe a second per model and process: a submit arriving within a second of the
        # queue filling may still be routed directly, but only to a provider that has room.
        now = asyncio.get_running_loop().time()
        seen = self._waiting.get(model_id)
        if seen is not None and now - seen[0] < WAITING_TTL_S:
            return seen[1]
        answer = await any_waiting(runtime, model_id)
        self._waiting[model_id] = (now, answer)
        return answer

    async def enqueue(
        self,
        runtime: Runtime,
        tenant: Any,
        key: Any,
        prediction: Any,
        *,
        reason: str,
        idempotency_key: str | None,
        status_url_base: str,
    ) -> Any:
        result = await enqueue(
            runtime,
            tenant,
            key,
            prediction,
            reason=reason,
            idempotency_key=idempotency_key,
            status_url_base=status_url_base,
        )
        self._waiting[prediction.model_id] = (asyncio.get_running_loop().time(), True)
        return result

    async def position(self, connection: AsyncConnection, tenant_id: str, prediction_id: str) -> int | None:
        return await position(connection, tenant_id, prediction_id)


# ---------------------------------------------------------------- endings without a send


async def fail_entries(
    session: AsyncSession, runtime: Runtime, failures: dict[str, str], *, outcome: str
) -> list[Prediction]:
    """Waiting predictions (queued, or sending with an unknown or refused outcome) end failed with the
    gateway's message: entry gone, provider slot, hold and tenant slot given back, webhook written, in the
    caller's transaction. The predictions ended (one no longer waiting is left alone)."""
    if not failures:
        return []
    ids = sorted(failures)
    entries: dict[str, Any] = {
        row.prediction_id: row
        for row in await session.execute(
            select(_entries.prediction_id, _entries.tenant_id, _entries.state, _entries.enqueued_at)
            .where(_entries.prediction_id.in_(ids))
            .with_for_update()
        )
    }
    now = clock.now()
    ended: list[Prediction] = []
    for prediction_id in ids:
        row = await session.scalar(
            update(Prediction)
            .where(Prediction.id == prediction_id, Prediction.status.in_(WAITING_STATUSES))
            .values(
                status=PredictionStatus.FAILED,
                error=failures[prediction_id][:500],
                completed_at=now,
                terminal_seen_at=now,
                next_poll_at=None,
            )
            .returning(Prediction)
            .execution_options(populate_existing=True, synchronize_session=False)
        )
        if row is not None:
            ended.append(row)
    await session.execute(delete(QueueEntry).where(QueueEntry.prediction_id.in_(ids)))
    queued_by_tenant: dict[str, int] = {}
    for entry in entries.values():
        if entry.state == QueueState.QUEUED:
            queued_by_tenant[entry.tenant_id] = queued_by_tenant.get(entry.tenant_id, 0) + 1
    for tenant_id, n in sorted(queued_by_tenant.items()):
        await session.execute(
            update(QueueTenant).where(QueueTenant.tenant_id == tenant_id).values(depth=QueueTenant.depth - n)
        )
    if not ended:
        return []
    slots: dict[str, int] = {}
    for p in ended:
        if p.holds_provider_slot and p.provider is not None:
            slots[p.provider] = slots.get(p.provider, 0) + 1
    await provider_health.give_slots(session, slots)
    await budgets_movements.release_many(
        session,
        [
            budgets_movements.Release(
                predictions_service.hold_of(p), p.estimate_cents, p.holds_slot, note=(p.error or "")[:200]
            )
            for p in ended
        ],
    )
    tenant_ids = sorted({p.tenant_id for p in ended})
    tenants = {t.id: t for t in await session.scalars(select(Tenant).where(Tenant.id.in_(tenant_ids)))}
    await webhooks_service.enqueue_prediction_events(
        session, runtime.settings, [(tenants[p.tenant_id], p, predictions_service.present(p)) for p in ended]
    )
    for p in ended:
        metrics.PREDICTIONS_FINISHED.labels(status=PredictionStatus.FAILED).inc()
        entry = entries.get(p.id)
        if entry is not None:
            metrics.QUEUE_WAIT.labels(outcome=outcome).observe(max(0.0, (now - entry.enqueued_at).total_seconds()))
        log.warning(
            "queued prediction failed", extra={"prediction_id": p.id, "tenant_id": p.tenant_id, "reason": p.error}
        )
    return ended


def max_wait_message(max_wait_s: float) -> str:
    return (
        f"No provider could take this prediction within {max_wait_s:g} s of its submit "
        "(VIDGATE_QUEUE_MAX_WAIT_S): the gateway gave up waiting. Nothing was charged."
    )


UNKNOWN_OUTCOME = (
    "The gateway lost the answer to sending this prediction to the video provider (it may or may not have "
    "started it), so it is never sent again. Nothing was charged; submit it again."
)


async def expire(runtime: Runtime, *, limit: int = 200) -> int:
    """Predictions queued longer than VIDGATE_QUEUE_MAX_WAIT_S end failed (hold released, webhook sent)."""
    max_wait_s = runtime.settings.queue_max_wait_s
    cutoff = clock.now() - timedelta(seconds=max_wait_s)
    async with transaction(runtime.sessions) as session:
        ids = list(
            await session.scalars(
                select(_entries.prediction_id)
                .where(_entries.state == QueueState.QUEUED, _entries.enqueued_at < cutoff)
                .order_by(_entries.enqueued_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        ended = await fail_entries(session, runtime, {i: max_wait_message(max_wait_s) for i in ids}, outcome="expired")
    return len(ended)


async def recover_sends(runtime: Runtime, *, limit: int = 200) -> int:
    """Entries left "sending" past their lease (the dispatching process died mid-send): never sent again.
    One whose confirm landed is only tidied away; the others end failed, hold released."""
    now = clock.now()
    async with transaction(runtime.sessions) as session:
        rows = (
            await session.execute(
                select(_entries.prediction_id, Prediction.status)
                .join(Prediction, Prediction.id == _entries.prediction_id)
                .where(_entries.state == QueueState.SENDING, _entries.lease_expires_at < now)
                .limit(limit)
                .with_for_update(skip_locked=True, of=table_of(QueueEntry))
            )
        ).all()
        sent = [r.prediction_id for r in rows if r.status not in WAITING_STATUSES]
        if sent:
            await session.execute(delete(QueueEntry).where(QueueEntry.prediction_id.in_(sent)))
        lost = {r.prediction_id: UNKNOWN_OUTCOME for r in rows if r.status in WAITING_STATUSES}
        for prediction_id in lost:
            log.error(
                "dispatch outcome unknown: failing it, never sending it again", extra={"prediction_id": prediction_id}
            )
        ended = await fail_entries(session, runtime, lost, outcome="unknown")
    return len(ended) + len(sent)


async def depths(session: AsyncSession) -> dict[str, int]:
    """Predictions waiting per tenant that ever queued (the dashboard and the metric)."""
    rows = await session.execute(select(_tenants.tenant_id, _tenants.depth))
    return {r.tenant_id: int(r.depth) for r in rows}


def waited_s(enqueued_at: datetime) -> float:
    return max(0.0, (clock.now() - enqueued_at).total_seconds())
