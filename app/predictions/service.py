"""Predictions: submit (hold, forward, settle), reads, terminal transitions and crash recovery."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, partial
from typing import Any, TypeVar

import orjson
from sqlalchemy import Integer, String, and_, bindparam, delete, func, insert, inspect, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter
from app.core import clock, lifecycle, metrics, prebuilt
from app.core.batching import Batcher
from app.core.database import (
    Reads,
    RowShape,
    UTCDateTime,
    insert_ignore,
    outage_backoff_s,
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
_INSERT = insert(_predictions)
# A confirm batch in one statement: the rows still "submitting" (the fence) start processing; RETURNING
# says which ones, so that only those are settled (app/budgets charges them).
_CONFIRM_SHAPE: RowShape = (
    ("id", String()),
    ("upstream_id", String()),
    ("estimated_time", String()),
    ("next_poll_at", UTCDateTime()),
    ("provider", String()),
)


@cache
def _confirm_statement(n: int) -> Any:
    rows = value_rows("confirm", _CONFIRM_SHAPE, n)
    return (
        update(_predictions)
        .where(
            _predictions.c.id == rows.c.id,
            # "sending": a queued prediction's dispatch (app/queue), fenced the same way.
            or_(
                _predictions.c.status == PredictionStatus.SUBMITTING,
                _predictions.c.status == PredictionStatus.SENDING,
            ),
        )
        .values(
            upstream_id=rows.c.upstream_id,
            status=PredictionStatus.PROCESSING,
            estimated_time=rows.c.estimated_time,
            next_poll_at=rows.c.next_poll_at,
            provider=rows.c.provider,
        )
        .returning(_predictions.c.id)
    )


# A release batch's change of state, the same way.
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


_SET_REF = (
    update(_predictions)
    .where(_predictions.c.id == bindparam("b_id"))
    .values(upstream_ref=bindparam("b_ref", type_=_predictions.c.upstream_ref.type))
)

_idempotency = table_of(IdempotencyKey).c
_REMEMBER_RESPONSE = (
    update(table_of(IdempotencyKey))
    .where(_idempotency.tenant_id == bindparam("b_tenant"), _idempotency.key == bindparam("b_key"))
    .values(response=bindparam("b_response", type_=_idempotency.response.type))
)
_FORGET = delete(table_of(IdempotencyKey)).where(
    _idempotency.tenant_id == bindparam("b_tenant"), _idempotency.key == bindparam("b_key")
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


async def hold(runtime: Runtime, job: _HoldJob) -> _Held | SubmitResult:
    """Claim the idempotency key, pass the limits and hold the estimate, in the ledger writer's next
    batch: committed before any provider is called, so concurrent requests and other replicas see it.
    The prediction held, or a replay of an earlier answer; raises the refusal. A caller that goes away
    meanwhile (its task cancelled) has its hold given back as soon as it commits."""
    abandoned = partial(_abandoned_hold, runtime, job.key, job.idempotency_key)
    result: _Held | SubmitResult = await _writer(runtime, "hold", _apply_holds).submit(job, on_abandoned=abandoned)
    return result


async def release(
    runtime: Runtime, prediction: Prediction, key: ApiKey, reason: str, idempotency_key: str | None
) -> None:
    """No provider accepted it: the hold and slots back, the Idempotency-Key freed (writer's next batch)."""
    job = _ReleaseJob(prediction, key, reason, idempotency_key)
    await _writer(runtime, "release", _apply_releases).submit(job, on_abandoned=_ignore)


async def abandon(runtime: Runtime, prediction: Prediction, key: ApiKey, idempotency_key: str | None) -> None:
    """The caller went away (a client gone, a shutdown) before a provider accepted its prediction: give the
    hold, the slots and the Idempotency-Key back now rather than when recovery finds the row,
    submit_recovery_s later. The release runs in a task of its own, which the caller's cancellation does
    not reach; waited for, so that it is done when the request's task is."""
    release = _release_abandoned(runtime, prediction, key, idempotency_key)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(release)


# ---------------------------------------------------------------- the ledger writers
#
# One writer per process and operation (hold, settle, release): a submit hands its step to the writer
# and awaits it; the writer applies everything that queued meanwhile in one transaction (one commit,
# multi-row statements where the rows are alike). The money rules stay in app/budgets/service.py.


@dataclass(frozen=True)
class _HoldJob:
    tenant: Tenant
    key: ApiKey
    model_id: str
    request: GenerateRequest
    prediction_id: str
    idempotency_key: str | None
    fingerprint: str
    public_base_url: str | None = None
    # The candidates' prices by the providers file, and whether one is charged the cost its answer
    # reports (held at the estimate): the hold is the highest (budgets_service.hold_cents).
    provider_prices: tuple[int, ...] = ()
    answer_priced: bool = True


@dataclass(frozen=True)
class _ConfirmJob:
    tenant: Tenant
    key: ApiKey
    prediction: Prediction
    estimate: budgets_service.Estimate
    submitted: UpstreamSubmitted
    idempotency_key: str | None
    status_url_base: str
    # The provider that accepted it, and its price by the file (charged when its answer carries no cost).
    provider: str = "vibedream"
    price_cents: int | None = None

    @property
    def cost(self) -> int:
        return budgets_service.provider_charge(self.submitted.cost_cents, self.price_cents)


@dataclass(frozen=True)
class _ReleaseJob:
    prediction: Prediction
    key: ApiKey
    reason: str
    idempotency_key: str | None


_Held = tuple[Prediction, budgets_service.Estimate]
J = TypeVar("J")
# A writer's apply: the jobs of one batch, in one transaction, to one result (or refusal) per job.
_Apply = Callable[[Runtime, AsyncSession, list[J]], Awaitable[list[Any]]]


def _writer(runtime: Runtime, op: str, apply: _Apply[J]) -> Batcher[J, Any]:
    writer = runtime.writers.get(op)
    if writer is None:

        async def run(jobs: list[J]) -> list[Any]:
            return await _in_transactions(runtime, apply, jobs)

        writer = runtime.writers[op] = Batcher(run, observe=metrics.LEDGER_BATCH_SIZE.labels(op=op).observe)
    return writer


async def _in_transactions(runtime: Runtime, apply: _Apply[J], jobs: list[J]) -> list[Any]:
    """The batch in one transaction. If it fails for a reason other than an outage (a deadlock, a bug
    one job triggers), each job runs alone, so one job's failure is its caller's alone."""
    try:
        async with transaction(runtime.sessions) as session:
            return await apply(runtime, session, jobs)
    except DatabaseUnavailable:
        raise
    except Exception:
        if len(jobs) == 1:
            raise
    results: list[Any] = []
    for job in jobs:
        try:
            async with transaction(runtime.sessions) as session:
                results += await apply(runtime, session, [job])
        except Exception as exc:
            results.append(exc)
    return results


async def _apply_holds(
    runtime: Runtime, session: AsyncSession, jobs: list[_HoldJob]
) -> list[_Held | SubmitResult | BaseException]:
    return await _hold_batch(session, runtime, jobs)


async def _apply_confirms(runtime: Runtime, session: AsyncSession, jobs: list[_ConfirmJob]) -> list[dict[str, Any]]:
    confirmed = await _confirm_many(session, runtime, jobs)
    bodies = [
        present_submit(p, f"{job.status_url_base}/{p.id}", extended=False)
        for job, p in zip(jobs, confirmed, strict=True)
    ]
    remembered = [
        {"b_tenant": job.tenant.id, "b_key": job.idempotency_key, "b_response": body}
        for job, body in zip(jobs, bodies, strict=True)
        if job.idempotency_key is not None
    ]
    if remembered:
        await session.execute(_REMEMBER_RESPONSE, remembered)
    return bodies


async def _apply_releases(runtime: Runtime, session: AsyncSession, jobs: list[_ReleaseJob]) -> list[bool]:
    released = await _release_many(session, [(job.prediction, job.reason, job.key) for job in jobs])
    forgotten = [
        {"b_tenant": job.prediction.tenant_id, "b_key": job.idempotency_key}
        for job in jobs
        if job.idempotency_key is not None
    ]
    if forgotten:
        await session.execute(_FORGET, forgotten)
    return [job.prediction.id in released for job in jobs]


ABANDONED = "the client went away before the upstream confirmed the prediction"
# Releases of abandoned holds in flight: a task needs a strong reference until it is done.
_releasing: set[asyncio.Task[None]] = set()


def _ignore(_result: object) -> None:
    """on_abandoned for a writer job that needs nothing more once applied (its caller is gone)."""


def _abandoned_hold(runtime: Runtime, key: ApiKey, idempotency_key: str | None, held: _Held | SubmitResult) -> None:
    """A hold committed for a caller that went away while its batch ran: give it back."""
    if not isinstance(held, SubmitResult):
        _release_abandoned(runtime, held[0], key, idempotency_key)


def _release_abandoned(
    runtime: Runtime, prediction: Prediction, key: ApiKey, idempotency_key: str | None
) -> asyncio.Task[None]:
    task = asyncio.create_task(_release_quietly(runtime, _ReleaseJob(prediction, key, ABANDONED, idempotency_key)))
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)
    return task


async def _release_quietly(runtime: Runtime, job: _ReleaseJob) -> None:
    try:
        await _writer(runtime, "release", _apply_releases).submit(job, on_abandoned=_ignore)
    except Exception as exc:  # recovery releases it later (submit_recovery_s)
        log.warning(
            "abandoned hold not released yet",
            extra={"prediction_id": job.prediction.id, "error_type": type(exc).__name__},
        )


async def confirm_until_recorded(runtime: Runtime, job: _ConfirmJob) -> dict[str, Any]:
    """Record what the vendor accepted, trying again through a database outage for as long as it is
    safe: until half of `submit_recovery_s` after the hold, so recovery (which releases holds older
    than that) never races a confirm still trying. Other database errors get a few quick retries."""
    prediction, submitted = job.prediction, job.submitted
    loop = asyncio.get_running_loop()
    window_s = runtime.settings.submit_recovery_s / 2 - (clock.now() - prediction.created_at).total_seconds()
    deadline = loop.time() + window_s
    failures = 0
    while True:
        try:
            # The vendor has billed: recorded even if the caller goes away before the batch is taken.
            body: dict[str, Any] = await _writer(runtime, "settle", _apply_confirms).submit(job, on_abandoned=_ignore)
            return body
        except (DatabaseUnavailable, DBAPIError) as exc:
            failures += 1
            outage = isinstance(exc, DatabaseUnavailable)
            pause = outage_backoff_s(failures, cap_s=1.0)
            given_up = failures >= CONFIRM_ATTEMPTS if not outage else loop.time() + pause > deadline
            if given_up:
                # The operator reconciles from this line, whatever the error: the vendor billed a run the
                # ledger will not show (recovery releases its hold).
                log.error(
                    "confirm abandoned: the upstream accepted a prediction the database could not record",
                    extra={
                        "prediction_id": prediction.id,
                        "upstream_id": submitted.id,
                        "cost_cents": submitted.cost_cents,
                        "error_type": type(exc).__name__,
                    },
                )
            if given_up and not outage:
                raise
            if given_up:
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
    scheduled = await session.scalar(select(Prediction.next_poll_at).where(Prediction.id == existing.prediction_id))
    return SubmitResult(
        existing.response, replayed=True, prediction_id=existing.prediction_id or "", next_poll_at=scheduled
    )


async def _forget_idempotency_key(session: AsyncSession, tenant_id: str, idempotency_key: str) -> None:
    """Only successes are remembered: after a failure the caller may retry with the same key."""
    await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == idempotency_key)
    )


async def _hold_batch(
    session: AsyncSession, runtime: Runtime, jobs: list[_HoldJob]
) -> list[_Held | SubmitResult | BaseException]:
    """Claim the jobs' idempotency keys, then hold their estimates in one reserve_many and insert the
    admitted predictions in one statement. Each job gets its prediction, a replay or its refusal."""
    settings = runtime.settings
    now = clock.now()
    results: dict[int, _Held | SubmitResult | BaseException] = {}
    # By (tenant, key): two batches claiming the same keys wait for each other in one order (lock order:
    # app/budgets/service.py); the same key twice in a batch keeps its arrival order.
    claims = sorted(
        (job.tenant.id, job.idempotency_key, index) for index, job in enumerate(jobs) if job.idempotency_key
    )
    for _, _, index in claims:
        job = jobs[index]
        assert job.idempotency_key is not None
        try:
            replay = await _claim_idempotency_key(
                session, runtime, job.tenant, job.idempotency_key, job.fingerprint, job.prediction_id
            )
        except AppError as exc:
            results[index] = exc
            continue
        if replay is not None:
            results[index] = replay
    pending = [i for i in range(len(jobs)) if i not in results]
    estimates: dict[tuple[str, str, int], budgets_service.Estimate] = {}
    predictions: dict[int, tuple[Prediction, budgets_service.Estimate]] = {}
    for index in pending:
        job = jobs[index]
        resolution = job.request.resolution or budgets_service.DEFAULT_RESOLUTION
        duration = job.request.duration or budgets_service.DEFAULT_DURATION_S
        point = (job.model_id, resolution, duration)
        if not job.answer_priced:
            # Every candidate is priced by the file: nothing to estimate or learn.
            held = budgets_service.hold_cents(None, list(job.provider_prices))
            predictions[index] = (_new_prediction(job, held, now), budgets_service.Estimate(held, None))
            continue
        if point not in estimates:
            estimates[point] = await budgets_service.price_estimate(session, settings.price_table, *point)
        held = budgets_service.hold_cents(estimates[point].cents, list(job.provider_prices))
        predictions[index] = (_new_prediction(job, held, now), estimates[point])
    retry_after_s = max(1, round(settings.poll_interval_s))
    requests = [
        budgets_service.HoldRequest(
            tenant=jobs[i].tenant,
            key=jobs[i].key,
            hold=_hold(predictions[i][0], jobs[i].key),
            amount=predictions[i][0].estimate_cents,
            slot_retry_after_s=retry_after_s,
        )
        for i in pending
    ]
    admitted = []
    for index, refusal in zip(pending, await budgets_service.reserve_many(session, requests), strict=True):
        if refusal is None:
            results[index] = predictions[index]
            admitted.append(_row(predictions[index][0]))
            continue
        metrics.BUDGET_REFUSALS.labels(code=refusal.code).inc()
        results[index] = refusal
        if jobs[index].idempotency_key is not None:
            await _forget_idempotency_key(session, jobs[index].tenant.id, jobs[index].idempotency_key or "")
    if admitted:
        # A Core INSERT of many rows (no unit of work): the objects stay in memory for their requests.
        await prebuilt.execute_many(session, _INSERT, admitted)
    return [results[i] for i in range(len(jobs))]


def _new_prediction(job: _HoldJob, estimate_cents: int, now: datetime) -> Prediction:
    return Prediction(
        id=job.prediction_id,
        tenant_id=job.tenant.id,
        api_key_id=job.key.id,
        model_id=job.model_id,
        model_name=MODEL_NAMES.get(job.model_id, job.model_id),
        status=PredictionStatus.SUBMITTING,
        params=job.request.upstream_body(),
        webhook_url=job.request.webhook,
        public_base_url=job.public_base_url,
        webhook_events=job.request.webhook_events_filter,
        meta=job.request.metadata,
        **budgets_service.new_hold_columns(job.tenant, estimate_cents, now),
        holds_provider_slot=False,
        created_at=now,
        poll_count=0,
        poll_failures=0,
    )


async def _confirm_many(session: AsyncSession, runtime: Runtime, jobs: list[_ConfirmJob]) -> list[Prediction]:
    """What the vendor accepted, recorded for a batch: the predictions start processing (one statement,
    fenced on "submitting"), the prices seen are learnt, the predictions charged and their holds settled
    (app/budgets/service.py, a fixed number of statements however large the batch), and budget lines
    crossed are notified. The confirmed prediction of each job."""
    now = clock.now()
    states = {
        job.prediction.id: dict(
            upstream_id=job.submitted.id,
            status=PredictionStatus.PROCESSING,
            estimated_time=job.submitted.estimated_time,
            next_poll_at=first_poll_at(now, job.submitted.estimated_time, runtime.settings.poll_interval_s),
        )
        for job in jobs
    }
    providers = {job.prediction.id: job.provider for job in jobs}
    rows = [
        (id_, state["upstream_id"], state["estimated_time"], state["next_poll_at"], providers[id_])
        for id_, state in sorted(states.items())
    ]
    changed = {
        row.id
        for row in await prebuilt.fetch(
            session, _confirm_statement(value_rows_size(len(rows))), value_rows_params("confirm", _CONFIRM_SHAPE, rows)
        )
    }
    refs = [
        {"b_id": job.prediction.id, "b_ref": job.submitted.ref}
        for job in jobs
        if job.submitted.ref is not None and job.prediction.id in changed
    ]
    if refs:
        await session.execute(_SET_REF, refs)
    confirmed: list[Prediction] = []
    settles: list[budgets_service.Settle] = []
    learnt: dict[tuple[str, str, int], int] = {}
    for job in jobs:
        if job.prediction.id not in changed:
            late, late_settle = await _confirm_late(session, job, states[job.prediction.id])
            job.prediction.next_poll_at = late.next_poll_at  # the caller's copy shows the poll queue's
            confirmed.append(late)
            settles += [late_settle] if late_settle is not None else []
            continue
        prediction, cost = job.prediction, job.cost
        for name, value in states[prediction.id].items():
            setattr(prediction, name, value)  # the caller's copy, never added to the session: what the row says
        prediction.provider = job.provider
        prediction.upstream_ref = job.submitted.ref
        confirmed.append(prediction)
        settles.append(
            budgets_service.Settle(job.tenant, _hold(prediction, job.key), prediction.estimate_cents, cost, prediction)
        )
        if job.submitted.cost_cents is not None and (job.estimate.seen_cents is None or cost > job.estimate.seen_cents):
            params = prediction.params
            point = (
                prediction.model_id,
                str(params.get("resolution", budgets_service.DEFAULT_RESOLUTION)),
                int(params.get("duration", budgets_service.DEFAULT_DURATION_S)),
            )
            learnt[point] = max(cost, learnt.get(point, 0))
    # The price points before the counters: the counter rows stay locked from their UPDATE to the COMMIT.
    await budgets_service.learn_prices(session, learnt)
    crossed = await budgets_service.settle_many(session, settles)
    for tenant, percent in crossed:
        usage = await budgets_service.tenant_usage(session, tenant)
        await webhooks_service.enqueue_budget_threshold(session, tenant, percent, usage)
    return confirmed


async def _confirm_late(
    session: AsyncSession, job: _ConfirmJob, state: dict[str, Any]
) -> tuple[Prediction, budgets_service.Settle | None]:
    """A confirm whose prediction is no longer "submitting": the prediction, and its charge if it is to be
    recorded (settled with the batch's, so that its slot and counters are locked in the one order)."""
    held, submitted = job.prediction, job.submitted
    prediction = await session.get(Prediction, held.id, populate_existing=True)
    assert prediction is not None
    if prediction.upstream_id == submitted.id:
        return prediction, None  # a retried confirm whose first COMMIT did land: charged once already
    # Unreachable while submit_recovery_s exceeds the upstream timeout (settings enforce it);
    # if it happens anyway, the vendor billed us, so the charge is recorded all the same.
    log.error("late upstream confirmation", extra={"prediction_id": held.id, "provider": job.provider})
    prediction.upstream_id = submitted.id
    prediction.provider = job.provider
    prediction.upstream_ref = submitted.ref
    prediction.status = PredictionStatus.PROCESSING
    prediction.next_poll_at = state["next_poll_at"]
    await session.flush()
    charge = budgets_service.Settle(
        job.tenant, _hold(prediction), 0, job.cost, prediction, late=True, late_slot=prediction.holds_slot
    )
    return prediction, charge


async def _release_many(session: AsyncSession, held: list[tuple[Prediction, str, ApiKey | None]]) -> set[str]:
    """The upstream never confirmed these: they become "rejected" (the rows stay for the record), and
    their holds and slots are given back. The ids released (a prediction no longer "submitting" is not)."""
    if not held:
        return set()
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
    await budgets_service.release_many(
        session,
        [
            budgets_service.Release(_hold(p, key), p.estimate_cents, p.holds_slot, note=reason[:200])
            for p, reason, key in held
            if p.id in released
        ],
    )
    return released


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
    await budgets_service.start_counting_slots(session, tenant, in_flight)


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
    await budgets_service.end_many(
        session,
        [
            budgets_service.Ended(
                _hold(p),
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
        released = await _release_many(session, [(p, reason, None) for p in stuck])
        if released:
            await session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.prediction_id.in_(sorted(released)), IdempotencyKey.response.is_(None)
                )
            )
    return len(released)
