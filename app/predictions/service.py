"""Predictions: submit (hold, forward, settle), reads, terminal transitions and crash recovery."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import orjson
from sqlalchemy import Integer, String, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter
from app.core import clock, lifecycle, metrics, prebuilt
from app.core.database import (
    Reads,
    RowShape,
    table_of,
    transaction,
    value_rows,
    value_rows_params,
    value_rows_size,
)
from app.core.errors import AppError, Conflict, DatabaseUnavailable, InvalidRequest, NotFound
from app.core.ids import new_id
from app.core.retry_after import retry_after_value
from app.core.settings import Settings
from app.outputs import service as outputs_service
from app.predictions.models import (
    PUBLIC_STATUSES,
    TERMINAL_STATUSES,
    WAITING_STATUSES,
    IdempotencyKey,
    Prediction,
    PredictionStatus,
)
from app.predictions.schemas import GenerateRequest
from app.providers import health as provider_health
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.client import UpstreamRefused, UpstreamUnavailable
from app.upstream.schemas import UpstreamPrediction
from app.webhooks import service as webhooks_service

log = logging.getLogger("vidgate.predictions")

MODEL_NAMES = {"ltx-2-19b": "LTX-2 19B"}


class ModelNotFound(NotFound):
    code = "model_not_found"
    title = "Model not available"


class PredictionNotFound(NotFound):
    code = "prediction_not_found"
    title = "No such prediction"


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"
    title = "Idempotency-Key used with another request"


class IdempotencyKeyInFlight(Conflict):
    code = "idempotency_key_in_flight"
    title = "A request with this Idempotency-Key is still being processed"


class UpstreamRejected(AppError):
    status = 422
    code = "upstream_rejected"
    title = "The video provider refused the request"


class UpstreamError(AppError):
    status = 502
    code = "upstream_error"
    title = "The video provider failed"


class UpstreamDown(AppError):
    status = 503
    code = "upstream_unavailable"
    title = "The video provider is unreachable"


# ---------------------------------------------------------------- representation


def public_status(status: str) -> str:
    """Waiting in the fair queue is "processing" to a caller (SPEC §12)."""
    return PredictionStatus.PROCESSING if status in WAITING_STATUSES else status


def present(prediction: Prediction | Row[*tuple[Any, ...]]) -> dict[str, Any]:
    """The GET representation; webhooks carry exactly this as `data`. A prediction still queued also
    carries `queued: true` (its `queuePosition` is added by the reader, app/queue)."""
    body: dict[str, Any] = {
        "id": prediction.id,
        "modelId": prediction.model_id,
        "modelName": prediction.model_name,
        "status": public_status(prediction.status),
        "outputs": prediction.outputs,
        "error": prediction.error,
        "createdAt": clock.iso(prediction.created_at),
        "completedAt": clock.iso(prediction.completed_at),
        "costCents": prediction.charged_cents,
        "metadata": prediction.meta,
        "provider": prediction.provider,
    }
    if prediction.status == PredictionStatus.QUEUED:
        body["queued"] = True
    return body


def present_submit(prediction: Prediction, status_url: str, *, extended: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": prediction.id,
        "status": public_status(prediction.status),
        "statusUrl": status_url,
        "estimatedTime": prediction.estimated_time,
        "costCents": prediction.charged_cents,
        "createdAt": clock.iso(prediction.created_at),
        "metadata": prediction.meta,
        "provider": prediction.provider,
    }
    if extended:
        body.update(outputs=prediction.outputs, error=prediction.error, completedAt=clock.iso(prediction.completed_at))
    if prediction.status == PredictionStatus.QUEUED:
        body.update(queued=True, costCents=prediction.estimate_cents)
    return body


def first_poll_delay_s(estimated_time: str | None, default_s: float) -> float:
    """The lower bound of the vendor's estimate ("5-20s" -> 5): polling earlier only wastes calls."""
    if not estimated_time:
        return default_s
    match = re.match(r"\s*(\d+(?:\.\d+)?)\s*(?:-\s*\d+(?:\.\d+)?)?\s*(ms|s|m|min)?\s*$", estimated_time)
    if not match:
        return default_s
    value = float(match.group(1))
    unit = match.group(2) or "s"
    seconds = value / 1000 if unit == "ms" else value * 60 if unit in ("m", "min") else value
    return min(seconds, 600.0)


def first_poll_at(confirmed_at: datetime, estimated_time: str | None, default_s: float) -> datetime:
    """When the gateway first polls a prediction the vendor accepted at `confirmed_at`: the one place
    this is computed, for the poll queue and for the submit answer's Retry-After alike."""
    return confirmed_at + timedelta(seconds=first_poll_delay_s(estimated_time, default_s))


_predictions = table_of(Prediction)
# A release batch's change of state: the rows still "submitting" (the fence) become "rejected"; RETURNING
# says which ones, so that only those are released.
_REJECT_SHAPE: RowShape = (("id", String()), ("error", String()))


@cache
def _reject_statement(n: int) -> Any:
    rows = value_rows("reject", _REJECT_SHAPE, n)
    return (
        update(_predictions)
        .where(_predictions.c.id == rows.c.id, _predictions.c.status == PredictionStatus.SUBMITTING)
        .values(
            status="rejected",  # not a public status: the row stays for the record
            error=rows.c.error,
            completed_at=bindparam("b_now"),
        )
        .returning(_predictions.c.id, _predictions.c.provider, _predictions.c.holds_provider_slot)
    )


def hold_of(prediction: Prediction, key: ApiKey | None = None) -> budgets_service.Hold:
    return budgets_service.Hold(
        tenant_id=prediction.tenant_id,
        api_key_id=prediction.api_key_id,
        prediction_id=prediction.id,
        model_id=prediction.model_id,
        period_start=prediction.period_start,
        key_budgeted=key is None or key.budget_cents is not None,
        provider=prediction.provider,
    )


# ---------------------------------------------------------------- submit


@dataclass(frozen=True)
class SubmitResult:
    body: dict[str, Any]
    replayed: bool
    prediction_id: str
    # When the gateway polls it next, as the poll queue has it (None: not known, or no longer scheduled).
    next_poll_at: datetime | None = None


def request_fingerprint(model_id: str, request: GenerateRequest) -> str:
    canonical = {"modelId": model_id, **request.model_dump(mode="json", by_alias=True, exclude_none=True)}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def check_submittable(runtime: Runtime, model_id: str, request: GenerateRequest) -> None:
    """Everything decidable without the database, so bad input costs nothing."""
    if model_id not in runtime.settings.allowed_models:
        raise ModelNotFound(
            f"Model {model_id!r} is not available here. Allowed: {', '.join(runtime.settings.allowed_models)}.",
            modelId=model_id,
        )
    webhooks_service.check_webhook_url(runtime.settings, request.webhook, "webhook")


async def release_many(session: AsyncSession, held: list[tuple[Prediction, str, ApiKey | None]]) -> set[str]:
    """The upstream never confirmed these: they become "rejected" (the rows stay for the record), and
    their holds and slots are given back. The ids released (a prediction no longer "submitting" is not)."""
    released, releases = await reject_many(session, held)
    await budgets_movements.release_many(session, releases)
    return released


async def reject_many(
    session: AsyncSession, held: list[tuple[Prediction, str, ApiKey | None]]
) -> tuple[set[str], list[budgets_movements.Release]]:
    """The first half of release_many, for a writer batch that moves its money at once: the predictions
    still "submitting" become "rejected" and their provider slots come back. The ids rejected, and the
    holds to give back."""
    if not held:
        return set(), []
    now = clock.now()
    rows = [(p.id, reason[:500]) for p, reason, _ in sorted(held, key=lambda h: h[0].id)]
    rejected = (
        await session.execute(
            _reject_statement(value_rows_size(len(rows))),
            {"b_now": now, **value_rows_params("reject", _REJECT_SHAPE, rows)},
        )
    ).all()
    released = {row.id for row in rejected}
    # Slots at providers taken for an attempt whose answer never came (a crash mid-submit) come back too.
    await provider_health.give_slots(session, _count_by_provider(r.provider for r in rejected if r.holds_provider_slot))
    releases = [
        budgets_movements.Release(hold_of(p, key), p.estimate_cents, p.holds_slot, note=reason[:200])
        for p, reason, key in held
        if p.id in released
    ]
    return released, releases


def _count_by_provider(names: Iterable[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def upstream_problem(exc: UpstreamRefused | UpstreamUnavailable) -> AppError:
    if isinstance(exc, UpstreamRefused):
        if exc.status in (401, 403):
            return UpstreamError(
                "The video provider refused the gateway's credentials. Nothing was charged; tell your operator."
            )
        return UpstreamRejected(
            f"The video provider refused the request ({exc.status}): {exc.message}. Nothing was charged.",
            upstreamStatus=exc.status,
            upstreamError=exc.message,
        )
    return UpstreamDown(
        f"The video provider could not be reached ({exc.reason}). Nothing was charged; retry later.",
        headers={"Retry-After": retry_after_value(exc.retry_after_s or 5)},
    )


async def start_counting_slots(session: AsyncSession, tenant: Tenant) -> None:
    """A tenant just got a maxConcurrent: its predictions already in flight take their slots now."""
    in_flight = select(Prediction.id).where(
        Prediction.tenant_id == tenant.id,
        Prediction.status.in_((PredictionStatus.SUBMITTING, PredictionStatus.PROCESSING, *WAITING_STATUSES)),
    )
    await budgets_movements.start_counting_slots(session, tenant, in_flight)


# ---------------------------------------------------------------- reads


async def get_for_tenant(session: AsyncSession, tenant_id: str, prediction_id: str) -> Prediction:
    prediction = await session.get(Prediction, prediction_id, populate_existing=True)
    if prediction is None or prediction.tenant_id != tenant_id or prediction.status not in PUBLIC_STATUSES:
        raise PredictionNotFound(f"There is no prediction {prediction_id!r} for this API key's tenant.")
    return prediction


_PUBLIC_COLUMNS = (
    _predictions.c.id,
    _predictions.c.model_id,
    _predictions.c.model_name,
    _predictions.c.status,
    _predictions.c.outputs,
    _predictions.c.error,
    _predictions.c.created_at,
    _predictions.c.completed_at,
    _predictions.c.charged_cents,
    _predictions.c.metadata.label("meta"),
    _predictions.c.provider,
)
_READ_WHERE = (
    _predictions.c.id == bindparam("b_id"),
    _predictions.c.tenant_id == bindparam("b_tenant_id"),
    # Not IN (...): an expanding IN is rendered again at every execution.
    or_(*(_predictions.c.status == status for status in PUBLIC_STATUSES)),
)


# GET's one statement: the prediction; by a primary-key probe of the tenant's counter row of the
# current period, the balance for the headers (the key check came from the cache); and what its current
# output links are computed from (one row per stored file when it was rehosted).
_counters = table_of(BudgetCounter).c
_READ_WITH_BALANCE = (
    select(
        *_PUBLIC_COLUMNS,
        _predictions.c.next_poll_at,
        _counters.spent_cents,
        _counters.reserved_cents,
        *outputs_service.LINK_COLUMNS,
    )
    .select_from(
        outputs_service.join_links(
            _predictions.outerjoin(
                table_of(BudgetCounter),
                and_(_counters.scope == bindparam("b_scope"), _counters.period_start == bindparam("b_period_start")),
            ),
            _predictions.c.id,
        )
    )
    .where(*_READ_WHERE)
)


@dataclass(frozen=True)
class Read:
    body: dict[str, Any]  # with the output links valid now
    next_poll_at: datetime | None
    spent_cents: int | None
    reserved_cents: int | None
    # Terminal and never rehosted: the body can never change again (its links carry no expiry).
    final: bool


async def read_with_balance(
    session: Reads, settings: Settings, tenant_id: str, prediction_id: str, scope: str, period_start: datetime
) -> Read | None:
    """The GET representation with its current links, when the gateway polls it next, and the tenant's
    counter (`scope`, `period_start`) in one statement; None: no such prediction for this tenant."""
    params = {"b_id": prediction_id, "b_tenant_id": tenant_id, "b_scope": scope, "b_period_start": period_start}
    rows = await prebuilt.fetch(session, _READ_WITH_BALANCE, params)
    if not rows:
        return None
    row = rows[0]
    body = present(row)
    rehosted = outputs_service.show_joined_links(settings, body, rows)
    final = row.status in TERMINAL_STATUSES and not rehosted
    return Read(body, row.next_poll_at, row.spent_cents, row.reserved_cents, final)


def not_found(prediction_id: str) -> PredictionNotFound:
    return PredictionNotFound(f"There is no prediction {prediction_id!r} for this API key's tenant.")


async def list_for_tenant(
    session: AsyncSession, tenant_id: str, *, status: PredictionStatus | None, limit: int, cursor: str | None
) -> tuple[list[Prediction], str | None]:
    stmt = select(Prediction).where(Prediction.tenant_id == tenant_id)
    if status == PredictionStatus.PROCESSING:
        stmt = stmt.where(Prediction.status.in_((status, *WAITING_STATUSES)))
    else:
        stmt = stmt.where(Prediction.status == status) if status else stmt.where(Prediction.status.in_(PUBLIC_STATUSES))
    if cursor:
        stmt = stmt.where(Prediction.id < cursor)
    rows = list(await session.scalars(stmt.order_by(Prediction.id.desc()).limit(limit + 1)))
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_cursor


async def wait_until_terminal(runtime: Runtime, tenant_id: str, prediction_id: str, wait_s: float) -> Prediction | None:
    """Watch the database, not this process: the poll may happen in another worker. The prediction as
    last read; None if the database could not be read at all (the submit itself was recorded, so an
    outage while waiting is no reason to answer it with an error)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    prediction: Prediction | None = None
    while True:
        try:
            async with transaction(runtime.sessions, readonly=True) as session:
                prediction = await get_for_tenant(session, tenant_id, prediction_id)
        except DatabaseUnavailable:
            pass
        remaining = deadline - asyncio.get_running_loop().time()
        if (
            (prediction is not None and prediction.status in TERMINAL_STATUSES)
            or remaining <= 0
            or lifecycle.stopping()
        ):
            return prediction  # a process stopping answers with what it has rather than hold its stop
        await asyncio.sleep(min(0.2, remaining))


# ---------------------------------------------------------------- terminal transitions


@dataclass(frozen=True)
class Finish:
    """What makes one prediction terminal: its final status and what the upstream said about it."""

    prediction_id: str
    status: PredictionStatus
    outputs: list[str] | None
    error: str | None
    completed_at: datetime | None
    model_name: str | None = None
    poll_count: int | None = None


_FINISH = (
    update(_predictions)
    .where(
        _predictions.c.id == bindparam("b_id"),
        _predictions.c.status == PredictionStatus.PROCESSING,
        # Fenced on the lease: `b_owner` NULL (no lease asked for) matches any row.
        or_(bindparam("b_owner", type_=String) == None, _predictions.c.lease_owner == bindparam("b_owner")),  # noqa: E711
    )
    .values(
        status=bindparam("b_status"),
        outputs=bindparam("b_outputs", type_=_predictions.c.outputs.type),
        error=bindparam("b_error"),
        completed_at=bindparam("b_completed_at"),
        terminal_seen_at=bindparam("b_now"),
        next_poll_at=None,
        # The batch's own mark, so that one statement afterwards finds exactly the rows this batch changed.
        lease_owner=bindparam("b_mark"),
        lease_expires_at=None,
        model_name=func.coalesce(bindparam("b_model_name", type_=String), _predictions.c.model_name),
        poll_count=func.coalesce(bindparam("b_poll_count", type_=Integer), _predictions.c.poll_count),
    )
)
_FINISHED = (
    update(Prediction)
    # By primary key, then the mark: the lease owner has no index.
    .where(Prediction.id.in_(bindparam("b_ids", expanding=True)), Prediction.lease_owner == bindparam("b_mark"))
    .values(lease_owner=None)
    .returning(Prediction)
    .execution_options(populate_existing=True, synchronize_session=False)
)


async def finish_many(
    session: AsyncSession, runtime: Runtime, finishes: list[Finish], *, lease_owner: str | None
) -> dict[str, Prediction]:
    """Make predictions terminal, release their slots, apply the failed-charge policy and write their
    webhook deliveries, all in the caller's transaction and as few statements as the rows allow (one
    UPDATE for all, one for the slots of each tenant, one INSERT of deliveries). Fenced on the lease:
    a prediction whose lease was taken over is left alone and missing from the answer (by id)."""
    if not finishes:
        return {}
    now = clock.now()
    mark = new_id("fin")
    await session.execute(
        _FINISH,
        [
            {
                "b_id": f.prediction_id,
                "b_owner": lease_owner,
                "b_status": f.status,
                "b_outputs": f.outputs,
                "b_error": f.error,
                "b_completed_at": f.completed_at or now,
                "b_now": now,
                "b_mark": mark,
                "b_model_name": f.model_name or None,
                "b_poll_count": f.poll_count,
            }
            for f in finishes
        ],
    )
    finished = list(await session.scalars(_FINISHED, {"b_ids": [f.prediction_id for f in finishes], "b_mark": mark}))
    if not finished:
        return {}
    refund_failed = not runtime.settings.keep_failed_charge
    await provider_health.give_slots(session, _count_by_provider(p.provider for p in finished if p.holds_provider_slot))
    await budgets_movements.end_many(
        session,
        [
            budgets_movements.Ended(
                hold_of(p),
                p.holds_slot,
                refund=(p.charged_cents or 0) if refund_failed and p.status == PredictionStatus.FAILED else 0,
                prediction=p,
            )
            for p in finished
        ],
    )
    tenant_ids = sorted({p.tenant_id for p in finished})
    tenants = {t.id: t for t in await session.scalars(select(Tenant).where(Tenant.id.in_(tenant_ids)))}
    await webhooks_service.enqueue_prediction_events(
        session, runtime.settings, [(tenants[p.tenant_id], p, present(p)) for p in finished]
    )
    for prediction in finished:
        metrics.PREDICTIONS_FINISHED.labels(status=prediction.status).inc()
        metrics.POLLS_PER_PREDICTION.observe(prediction.poll_count)
        log.info(
            "prediction finished",
            extra={"prediction_id": prediction.id, "tenant_id": prediction.tenant_id, "status": prediction.status},
        )
    metrics.LEDGER_BATCH_SIZE.labels(op="finish").observe(len(finishes))
    return {p.id: p for p in finished}


def final_state(prediction_id: str, upstream: UpstreamPrediction, *, poll_count: int) -> Finish:
    """The terminal transition one poll saw (a poll that saw "processing" is stored by the poller)."""
    status = PredictionStatus(upstream.status)
    assert status in TERMINAL_STATUSES, status
    return Finish(
        prediction_id,
        status,
        outputs=upstream.outputs if status == PredictionStatus.COMPLETED else None,
        error=upstream.error if status == PredictionStatus.FAILED else None,
        completed_at=upstream.completed_at,
        model_name=upstream.model_name,
        poll_count=poll_count,
    )


async def recover_interrupted_submits(runtime: Runtime) -> int:
    """Holds whose upstream call never came back (the process died mid-submit) are released, and their
    Idempotency-Key freed, so they never block the tenant."""
    cutoff = clock.now() - timedelta(seconds=runtime.settings.submit_recovery_s)
    async with transaction(runtime.sessions) as session:
        stuck = list(
            await session.scalars(
                select(Prediction)
                .where(Prediction.status == PredictionStatus.SUBMITTING, Prediction.created_at < cutoff)
                .limit(100)
                .with_for_update(skip_locked=True)
            )
        )
        reason = "gateway interrupted before the upstream confirmed it"
        released = await release_many(session, [(p, reason, None) for p in stuck])
        if released:
            await session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.prediction_id.in_(sorted(released)), IdempotencyKey.response.is_(None)
                )
            )
    return len(released)
