"""Predictions: submit (hold, forward, settle), reads, terminal transitions and crash recovery."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, delete, func, insert, inspect, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import limits as budget_limits
from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter
from app.core import clock, metrics
from app.core.database import insert_ignore, outage_backoff_s, table_of, transaction
from app.core.errors import AppError, Conflict, DatabaseUnavailable, InvalidRequest, NotFound
from app.core.ids import new_id
from app.core.retry_after import retry_after_value
from app.predictions.models import PUBLIC_STATUSES, TERMINAL_STATUSES, IdempotencyKey, Prediction, PredictionStatus
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.client import UpstreamRefused, UpstreamUnavailable
from app.upstream.schemas import UpstreamPrediction, UpstreamSubmitted
from app.webhooks import service as webhooks_service

log = logging.getLogger("vidgate.predictions")

CONFIRM_ATTEMPTS = 4
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


def present(prediction: Prediction | Row[*tuple[Any, ...]]) -> dict[str, Any]:
    """The GET representation; webhooks carry exactly this as `data`."""
    return {
        "id": prediction.id,
        "modelId": prediction.model_id,
        "modelName": prediction.model_name,
        "status": prediction.status,
        "outputs": prediction.outputs,
        "error": prediction.error,
        "createdAt": clock.iso(prediction.created_at),
        "completedAt": clock.iso(prediction.completed_at),
        "costCents": prediction.charged_cents,
        "metadata": prediction.meta,
    }


def present_submit(prediction: Prediction, status_url: str, *, extended: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": prediction.id,
        "status": prediction.status,
        "statusUrl": status_url,
        "estimatedTime": prediction.estimated_time,
        "costCents": prediction.charged_cents,
        "createdAt": clock.iso(prediction.created_at),
        "metadata": prediction.meta,
    }
    if extended:
        body.update(outputs=prediction.outputs, error=prediction.error, completedAt=clock.iso(prediction.completed_at))
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


_predictions = table_of(Prediction)
_INSERT = insert(_predictions)
_CONFIRM = (
    update(_predictions)
    .where(_predictions.c.id == bindparam("b_id"), _predictions.c.status == PredictionStatus.SUBMITTING)
    .values(
        upstream_id=bindparam("b_upstream_id"),
        status=PredictionStatus.PROCESSING,
        estimated_time=bindparam("b_estimated_time"),
        charged_cents=bindparam("b_charged_cents"),
        next_poll_at=bindparam("b_next_poll_at"),
    )
    .returning(_predictions.c.id)
)


@cache
def _columns() -> list[tuple[str, str]]:
    """(attribute, column) pairs: `meta` is stored as "metadata"."""
    mapper = inspect(Prediction)
    return [(mapper.get_property_by_column(c).key, c.key) for c in _predictions.c]


def _row(prediction: Prediction) -> dict[str, Any]:
    return {column: getattr(prediction, attribute) for attribute, column in _columns()}


def _hold(prediction: Prediction, key: ApiKey | None = None) -> budgets_service.Hold:
    return budgets_service.Hold(
        tenant_id=prediction.tenant_id,
        api_key_id=prediction.api_key_id,
        prediction_id=prediction.id,
        model_id=prediction.model_id,
        period_start=prediction.period_start,
        key_budgeted=key is None or key.budget_cents is not None,
    )


# ---------------------------------------------------------------- submit


@dataclass(frozen=True)
class SubmitResult:
    body: dict[str, Any]
    replayed: bool
    prediction_id: str


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


async def submit(
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    model_id: str,
    request: GenerateRequest,
    *,
    idempotency_key: str | None,
    status_url_base: str,
) -> SubmitResult:
    check_submittable(runtime, model_id, request)
    prediction_id = new_id("pred")
    fingerprint = request_fingerprint(model_id, request) if idempotency_key is not None else ""

    # Transaction 1: claim the idempotency key, pass the limits and hold the estimate. Committed
    # before the upstream call, so concurrent requests and other replicas see the hold.
    try:
        async with transaction(runtime.sessions) as session:
            if idempotency_key is not None:
                replay = await _claim_idempotency_key(
                    session, runtime, tenant, idempotency_key, fingerprint, prediction_id
                )
                if replay is not None:
                    return replay
            prediction, estimate = await _hold_and_record(
                session, runtime, tenant, key, model_id, request, prediction_id
            )
    except (budgets_service.BudgetExceeded, budget_limits.TooManyRequests):
        await _count_refusal(runtime, tenant.id)
        raise

    try:
        submitted = await runtime.upstream.submit(model_id, prediction.params)  # exactly what was recorded
    except (UpstreamRefused, UpstreamUnavailable) as exc:
        async with transaction(runtime.sessions) as session:
            await _abandon(session, prediction, reason=f"upstream did not accept the prediction: {exc}", key=key)
            if idempotency_key is not None:
                await _forget_idempotency_key(session, tenant.id, idempotency_key)
        raise _upstream_problem(exc) from exc

    # Transaction 2: the hold becomes the vendor's price, together with the upstream id. The vendor
    # has billed by now, so a database that is away is waited for rather than the charge lost.
    body = await _confirm_until_recorded(
        runtime, tenant, key, prediction, estimate, submitted, idempotency_key, status_url_base
    )
    log.info("prediction submitted", extra={"prediction_id": prediction.id, "cost_cents": submitted.cost_cents})
    return SubmitResult(body=body, replayed=False, prediction_id=prediction.id)


async def _confirm_until_recorded(
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    prediction: Prediction,
    estimate: budgets_service.Estimate,
    submitted: UpstreamSubmitted,
    idempotency_key: str | None,
    status_url_base: str,
) -> dict[str, Any]:
    """Record what the vendor accepted, trying again through a database outage for as long as it is
    safe: until half of `submit_recovery_s` after the hold, so recovery (which releases holds older
    than that) never races a confirm still trying. Other database errors get a few quick retries."""
    loop = asyncio.get_running_loop()
    window_s = runtime.settings.submit_recovery_s / 2 - (clock.now() - prediction.created_at).total_seconds()
    deadline = loop.time() + window_s
    failures = 0
    while True:
        try:
            async with transaction(runtime.sessions) as session:
                confirmed = await _confirm(session, runtime, tenant, key, prediction, estimate, submitted)
                body = present_submit(confirmed, f"{status_url_base}/{confirmed.id}", extended=False)
                if idempotency_key is not None:
                    await session.execute(
                        update(IdempotencyKey)
                        .where(IdempotencyKey.tenant_id == tenant.id, IdempotencyKey.key == idempotency_key)
                        .values(response=body)
                    )
            return body
        except (DatabaseUnavailable, DBAPIError) as exc:
            failures += 1
            outage = isinstance(exc, DatabaseUnavailable)
            pause = outage_backoff_s(failures, cap_s=1.0)
            if not outage and failures >= CONFIRM_ATTEMPTS:
                raise
            if outage and loop.time() + pause > deadline:
                # The operator reconciles from this line: the vendor billed a run the ledger will not show.
                log.error(
                    "confirm abandoned: the upstream accepted a prediction the database could not record",
                    extra={
                        "prediction_id": prediction.id,
                        "upstream_id": submitted.id,
                        "cost_cents": submitted.cost_cents,
                    },
                )
                raise DatabaseUnavailable(
                    f"The video provider accepted prediction {prediction.id} and billed it, but the gateway's "
                    "database stayed unreachable, so recording it could not be confirmed. GET it later: if it "
                    "is unknown (404), it is not tracked, charged to your budget or notified (your operator "
                    "finds it in the gateway's log), and submitting again starts, and bills, a new run.",
                    predictionId=prediction.id,
                ) from exc
            log.warning(
                "confirm retried",
                extra={"prediction_id": prediction.id, "error_type": type(exc).__name__, "attempt": failures},
            )
            await asyncio.sleep(pause)


async def _count_refusal(runtime: Runtime, tenant_id: str) -> None:
    # Best effort, after the refused transaction rolled back: the caller's answer is the refusal
    # whether or not the count lands.
    try:
        async with transaction(runtime.sessions) as session:
            await budgets_service.record_refusal(session, tenant_id)
    except DBAPIError as exc:
        log.warning("refusal not counted", extra={"tenant_id": tenant_id, "error_type": type(exc).__name__})


async def _claim_idempotency_key(
    session: AsyncSession,
    runtime: Runtime,
    tenant: Tenant,
    idempotency_key: str,
    fingerprint: str,
    prediction_id: str,
) -> SubmitResult | None:
    now = clock.now()
    row = dict(
        tenant_id=tenant.id,
        key=idempotency_key,
        request_hash=fingerprint,
        prediction_id=prediction_id,
        response=None,
        created_at=now,
        expires_at=now + timedelta(seconds=runtime.settings.idempotency_ttl_s),
    )
    if await insert_ignore(session, IdempotencyKey, [row]):
        return None
    existing = await session.get(IdempotencyKey, (tenant.id, idempotency_key), populate_existing=True)
    if existing is None or existing.expires_at <= now:
        # Expired (or removed after a failure) between our insert and read: start afresh.
        await session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant.id, IdempotencyKey.key == idempotency_key)
        )
        await insert_ignore(session, IdempotencyKey, [row])
        return None
    if existing.request_hash != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request body or model. "
            "Use a new key for a new request.",
            field="Idempotency-Key",
        )
    if existing.response is None:
        raise IdempotencyKeyInFlight(
            "A request with this Idempotency-Key is still in flight. Retry in a moment to get its answer.",
            headers={"Retry-After": retry_after_value(1)},
        )
    return SubmitResult(body=existing.response, replayed=True, prediction_id=existing.prediction_id or "")


async def _forget_idempotency_key(session: AsyncSession, tenant_id: str, idempotency_key: str) -> None:
    """Only successes are remembered: after a failure the caller may retry with the same key."""
    await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == idempotency_key)
    )


async def _hold_and_record(
    session: AsyncSession,
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    model_id: str,
    request: GenerateRequest,
    prediction_id: str,
) -> tuple[Prediction, budgets_service.Estimate]:
    settings = runtime.settings
    now = clock.now()
    resolution = request.resolution or budgets_service.DEFAULT_RESOLUTION
    duration = request.duration or budgets_service.DEFAULT_DURATION_S
    period = budgets_service.period_of(tenant.budget_period, now)
    try:
        await budget_limits.consume_rate(session, tenant)
        estimate = await budgets_service.price_estimate(session, settings.price_table, model_id, resolution, duration)
        prediction = Prediction(
            id=prediction_id,
            tenant_id=tenant.id,
            api_key_id=key.id,
            model_id=model_id,
            model_name=MODEL_NAMES.get(model_id, model_id),
            status=PredictionStatus.SUBMITTING,
            params=request.upstream_body(),
            webhook_url=request.webhook,
            webhook_events=request.webhook_events_filter,
            meta=request.metadata,
            estimate_cents=estimate.cents,
            holds_slot=tenant.max_concurrent is not None,
            period_start=period.start,
            created_at=now,
            poll_count=0,
            poll_failures=0,
        )
        # A Core INSERT (no unit of work): the object stays in memory for the rest of the request.
        await session.execute(_INSERT, _row(prediction))
        # The contended rows (the tenant's slot count, its budget counter) are locked last, so they
        # stay locked only for these statements and the COMMIT.
        if prediction.holds_slot:
            await budget_limits.acquire_slot(session, tenant, retry_after_s=max(1, round(settings.poll_interval_s)))
        hold = budgets_service.Hold(tenant.id, key.id, prediction_id, model_id, period.start)
        await budgets_service.reserve(session, tenant, key, hold, estimate.cents)
    except AppError as exc:
        metrics.BUDGET_REFUSALS.labels(code=exc.code).inc()
        raise
    return prediction, estimate


async def _confirm(
    session: AsyncSession,
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    held: Prediction,
    estimate: budgets_service.Estimate,
    submitted: UpstreamSubmitted,
) -> Prediction:
    now = clock.now()
    delay = first_poll_delay_s(submitted.estimated_time, runtime.settings.poll_interval_s)
    confirmed = dict(
        upstream_id=submitted.id,
        status=PredictionStatus.PROCESSING,
        estimated_time=submitted.estimated_time,
        charged_cents=submitted.cost_cents,
        next_poll_at=now + timedelta(seconds=delay),
    )
    stored = await session.scalar(
        _CONFIRM, {"b_id": held.id, **{f"b_{k}": v for k, v in confirmed.items() if k != "status"}}
    )
    prediction: Prediction | None = None
    if stored is not None:
        prediction = held
        for name, value in confirmed.items():
            setattr(prediction, name, value)
    if prediction is None:
        prediction = await session.get(Prediction, held.id, populate_existing=True)
        assert prediction is not None
        if prediction.upstream_id == submitted.id:
            return prediction  # a retried confirm whose first COMMIT did land: charged once already
        # Unreachable while submit_recovery_s exceeds the upstream timeout (settings enforce it);
        # if it happens anyway, the vendor billed us, so the charge is recorded all the same.
        log.error("late upstream confirmation", extra={"prediction_id": held.id})
        await budgets_service.settle(session, _hold(prediction), 0, submitted.cost_cents)
        prediction.upstream_id = submitted.id
        prediction.charged_cents = submitted.cost_cents
        prediction.status = PredictionStatus.PROCESSING
        prediction.next_poll_at = now + timedelta(seconds=delay)
        if prediction.holds_slot:
            await session.execute(update(Tenant).where(Tenant.id == tenant.id).values(in_flight=Tenant.in_flight + 1))
        await session.flush()
        return prediction
    cost = submitted.cost_cents
    spent_after = await budgets_service.settle(session, _hold(prediction, key), prediction.estimate_cents, cost)
    if estimate.seen_cents is None or cost > estimate.seen_cents:
        params = prediction.params
        await budgets_service.learn_price(
            session,
            prediction.model_id,
            str(params.get("resolution", budgets_service.DEFAULT_RESOLUTION)),
            int(params.get("duration", budgets_service.DEFAULT_DURATION_S)),
            cost,
        )
    await _notify_thresholds(session, tenant, prediction.period_start, spent_after - cost, spent_after)
    return prediction


async def _notify_thresholds(
    session: AsyncSession, tenant: Tenant, period_start: datetime, spent_before: int, spent_after: int
) -> None:
    crossed = await budgets_service.newly_crossed_thresholds(session, tenant, period_start, spent_before, spent_after)
    if crossed:
        usage = await budgets_service.tenant_usage(session, tenant)
        for percent in crossed:
            await webhooks_service.enqueue_budget_threshold(session, tenant, percent, usage)


async def _abandon(session: AsyncSession, held: Prediction, *, reason: str, key: ApiKey | None = None) -> bool:
    """The upstream never confirmed: release the hold and the slot. The row stays for the record."""
    result = await session.execute(
        update(Prediction)
        .where(Prediction.id == held.id, Prediction.status == PredictionStatus.SUBMITTING)
        .values(status="rejected", error=reason[:500], completed_at=clock.now())
        .returning(Prediction.id)
    )
    if result.first() is None:
        return False
    await budgets_service.release(session, _hold(held, key), held.estimate_cents, note=reason[:200])
    if held.holds_slot:
        await budget_limits.release_slot(session, held.tenant_id)
    return True


def _upstream_problem(exc: UpstreamRefused | UpstreamUnavailable) -> AppError:
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
    in_flight = (
        Prediction.tenant_id == tenant.id,
        Prediction.status.in_((PredictionStatus.SUBMITTING, PredictionStatus.PROCESSING)),
    )
    await session.execute(
        update(Prediction).where(*in_flight).values(holds_slot=True).execution_options(synchronize_session=False)
    )
    count = await session.scalar(select(func.count()).select_from(Prediction).where(*in_flight))
    tenant.in_flight = count or 0
    await session.flush()


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
)
_READ_WHERE = (
    _predictions.c.id == bindparam("b_id"),
    _predictions.c.tenant_id == bindparam("b_tenant_id"),
    # Not IN (...): an expanding IN is rendered again at every execution.
    or_(*(_predictions.c.status == status for status in PUBLIC_STATUSES)),
)
_READ = select(*_PUBLIC_COLUMNS, _predictions.c.next_poll_at).where(*_READ_WHERE)


# GET's one statement: the prediction and, by a primary-key probe of the tenant's counter row of the
# current period, the balance for the headers (the key check came from the cache).
_counters = table_of(BudgetCounter).c
_READ_WITH_BALANCE = (
    select(*_PUBLIC_COLUMNS, _predictions.c.next_poll_at, _counters.spent_cents, _counters.reserved_cents)
    .select_from(_predictions)
    .outerjoin(
        table_of(BudgetCounter),
        and_(_counters.scope == bindparam("b_scope"), _counters.period_start == bindparam("b_period_start")),
    )
    .where(*_READ_WHERE)
)


@dataclass(frozen=True)
class Read:
    body: dict[str, Any]
    next_poll_at: datetime | None
    spent_cents: int | None
    reserved_cents: int | None


async def read_with_balance(
    session: AsyncSession, tenant_id: str, prediction_id: str, scope: str, period_start: datetime
) -> Read | None:
    """The GET representation, when the gateway polls it next, and the tenant's counter (`scope`,
    `period_start`) in one statement; None: no such prediction for this tenant."""
    params = {"b_id": prediction_id, "b_tenant_id": tenant_id, "b_scope": scope, "b_period_start": period_start}
    row = (await session.execute(_READ_WITH_BALANCE, params)).first()
    if row is None:
        return None
    return Read(present(row), row.next_poll_at, row.spent_cents, row.reserved_cents)


def not_found(prediction_id: str) -> PredictionNotFound:
    return PredictionNotFound(f"There is no prediction {prediction_id!r} for this API key's tenant.")


async def read_for_tenant(session: AsyncSession, tenant_id: str, prediction_id: str) -> dict[str, Any]:
    """The GET representation, read as plain columns: the hot path loads no ORM object."""
    return (await read_with_next_poll(session, tenant_id, prediction_id))[0]


async def read_with_next_poll(
    session: AsyncSession, tenant_id: str, prediction_id: str
) -> tuple[dict[str, Any], datetime | None]:
    """The GET representation and when the gateway polls it next (for Retry-After), in one query."""
    row = (await session.execute(_READ, {"b_id": prediction_id, "b_tenant_id": tenant_id})).first()
    if row is None:
        raise not_found(prediction_id)
    return present(row), row.next_poll_at


async def list_for_tenant(
    session: AsyncSession, tenant_id: str, *, status: PredictionStatus | None, limit: int, cursor: str | None
) -> tuple[list[Prediction], str | None]:
    stmt = select(Prediction).where(Prediction.tenant_id == tenant_id)
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
        if (prediction is not None and prediction.status in TERMINAL_STATUSES) or remaining <= 0:
            return prediction
        await asyncio.sleep(min(0.2, remaining))


# ---------------------------------------------------------------- terminal transitions


async def finish(
    session: AsyncSession,
    runtime: Runtime,
    prediction_id: str,
    *,
    lease_owner: str | None,
    status: PredictionStatus,
    outputs: list[str] | None,
    error: str | None,
    completed_at: datetime | None,
    model_name: str | None = None,
    poll_count: int | None = None,
) -> Prediction | None:
    """Make a prediction terminal, release its slot, apply the failed-charge policy and write its
    webhook deliveries, all in the caller's transaction. Fenced on the lease: a worker whose lease
    was taken over changes nothing and gets None."""
    now = clock.now()
    conditions = [Prediction.id == prediction_id, Prediction.status == PredictionStatus.PROCESSING]
    if lease_owner is not None:
        conditions.append(Prediction.lease_owner == lease_owner)
    values: dict[str, Any] = dict(
        status=status,
        outputs=outputs,
        error=error,
        completed_at=completed_at or now,
        terminal_seen_at=now,
        next_poll_at=None,
        lease_owner=None,
        lease_expires_at=None,
    )
    if model_name:
        values["model_name"] = model_name
    if poll_count is not None:
        values["poll_count"] = poll_count
    prediction = await session.scalar(
        update(Prediction)
        .where(*conditions)
        .values(**values)
        .returning(Prediction)
        .execution_options(populate_existing=True)
    )
    if prediction is None:
        return None
    if prediction.holds_slot:
        await budget_limits.release_slot(session, prediction.tenant_id)
    if status == PredictionStatus.FAILED and not runtime.settings.keep_failed_charge and prediction.charged_cents:
        await budgets_service.refund(session, _hold(prediction), prediction.charged_cents, note="failed prediction")
        prediction.charged_cents = 0
        await session.flush()
    tenant = await session.get(Tenant, prediction.tenant_id)
    assert tenant is not None
    await webhooks_service.enqueue_prediction_event(session, runtime.settings, tenant, prediction, present(prediction))
    metrics.PREDICTIONS_FINISHED.labels(status=status).inc()
    log.info(
        "prediction finished",
        extra={"prediction_id": prediction.id, "tenant_id": prediction.tenant_id, "status": status},
    )
    metrics.POLLS_PER_PREDICTION.observe(prediction.poll_count)
    return prediction


async def apply_poll_result(
    session: AsyncSession,
    runtime: Runtime,
    prediction: Prediction,
    upstream: UpstreamPrediction,
    lease_owner: str,
) -> bool:
    """Store the final state one poll saw (a poll that saw "processing" is stored by the poller, in
    bulk). Returns False when the lease was lost (the write was refused)."""
    status = PredictionStatus(upstream.status)
    assert status in TERMINAL_STATUSES, status
    done = await finish(
        session,
        runtime,
        prediction.id,
        lease_owner=lease_owner,
        status=status,
        outputs=upstream.outputs if status == PredictionStatus.COMPLETED else None,
        error=upstream.error if status == PredictionStatus.FAILED else None,
        completed_at=upstream.completed_at,
        model_name=upstream.model_name,
        poll_count=prediction.poll_count,
    )
    return done is not None


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
        recovered = 0
        for prediction in stuck:
            if await _abandon(session, prediction, reason="gateway interrupted before the upstream confirmed it"):
                recovered += 1
                await session.execute(
                    delete(IdempotencyKey).where(
                        IdempotencyKey.prediction_id == prediction.id, IdempotencyKey.response.is_(None)
                    )
                )
    return recovered
