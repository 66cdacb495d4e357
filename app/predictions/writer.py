"""The ledger writer: one per process. A submit hands each of its money steps to it (the hold before the
provider is called, the settle once one accepted, the release when none did) and awaits it; the writer
applies everything that queued meanwhile as one batch, in one transaction: one commit, and multi-row
statements where the rows are alike. The money rules stay in app/budgets/movements.py.

Why one writer for all three steps: holds and settles of the same tenant lock the same counter row, so
two writers (one per step) queued behind each other's commits; one writer takes both in one transaction
(bench/FINDINGS.md, issue 25)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, partial
from typing import Any

import orjson
from sqlalchemy import String, bindparam, delete, insert, inspect, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import fastbatch
from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.core import clock, metrics, prebuilt
from app.core.batching import Batcher
from app.core.database import (
    OwnConnection,
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
from app.core.errors import AppError, DatabaseUnavailable
from app.core.retry_after import retry_after_value
from app.predictions import service
from app.predictions.models import IdempotencyKey, Prediction, PredictionStatus
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.schemas import UpstreamSubmitted
from app.webhooks import service as webhooks_service

log = logging.getLogger("vidgate.predictions")

CONFIRM_ATTEMPTS = 4

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


async def hold(runtime: Runtime, job: HoldJob) -> _Held | service.SubmitResult:
    """Claim the idempotency key, pass the limits and hold the estimate, in the ledger writer's next
    batch: committed before any provider is called, so concurrent requests and other replicas see it.
    The prediction held, or a replay of an earlier answer; raises the refusal. A caller that goes away
    meanwhile (its task cancelled) has its hold given back as soon as it commits."""
    abandoned = partial(_abandoned_hold, runtime, job.key, job.idempotency_key)
    result: _Held | service.SubmitResult = await _writer(runtime).submit(job, on_abandoned=abandoned)
    return result


async def release(
    runtime: Runtime, prediction: Prediction, key: ApiKey, reason: str, idempotency_key: str | None
) -> None:
    """No provider accepted it: the hold and slots back, the Idempotency-Key freed (writer's next batch)."""
    job = ReleaseJob(prediction, key, reason, idempotency_key)
    await _writer(runtime).submit(job, on_abandoned=_ignore)


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
# multi-row statements where the rows are alike). The money rules stay in app/budgets/movements.py.


@dataclass(frozen=True)
class HoldJob:
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
class ConfirmJob:
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
class ReleaseJob:
    prediction: Prediction
    key: ApiKey
    reason: str
    idempotency_key: str | None


_Held = tuple[Prediction, budgets_service.Estimate]
Job = HoldJob | ConfirmJob | ReleaseJob


def _writer(runtime: Runtime) -> Batcher[Job, Any]:
    writer = runtime.writers.get("ledger")
    if writer is None:

        async def run(jobs: list[Job]) -> list[Any]:
            return await _in_transactions(runtime, jobs)

        writer = runtime.writers["ledger"] = Batcher(run)
    return writer


_KINDS = ((HoldJob, "hold"), (ConfirmJob, "settle"), (ReleaseJob, "release"))


def _observe(jobs: list[Job]) -> None:
    """The batch's size by kind of job (the metric's `op`), as when each kind had a writer of its own."""
    for kind, op in _KINDS:
        n = sum(isinstance(job, kind) for job in jobs)
        if n:
            metrics.LEDGER_BATCH_SIZE.labels(op=op).observe(n)


async def _in_transactions(runtime: Runtime, jobs: list[Job]) -> list[Any]:
    """The batch: its common jobs in one statement on PostgreSQL (_one_statement), the rest in one
    transaction. If that fails for a reason other than an outage (a deadlock, a bug one job triggers),
    each job runs alone, so one job's failure is its caller's alone."""
    _observe(jobs)
    results: list[Any] = [None] * len(jobs)
    rest = list(range(len(jobs)))
    if runtime.engine.dialect.name == "postgresql":
        done = await _one_statement(runtime, jobs)
        for index, result in done.items():
            results[index] = result
        rest = [i for i in rest if i not in done]
    if rest:
        for index, result in zip(rest, await _in_one_transaction(runtime, [jobs[i] for i in rest]), strict=True):
            results[index] = result
    return results


async def _in_one_transaction(runtime: Runtime, jobs: list[Job]) -> list[Any]:
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


def _common_hold(job: HoldJob) -> bool:
    """A hold app/budgets/fastbatch.py applies: no Idempotency-Key to claim, no rate unit or slot to
    take, no key counter."""
    tenant = job.tenant
    return (
        job.idempotency_key is None
        and tenant.rate_per_minute is None
        and tenant.max_concurrent is None
        and job.key.budget_cents is None
    )


def _common_confirm(job: ConfirmJob) -> bool:
    """A confirm app/budgets/fastbatch.py applies: no answer to remember, no key counter, no price to
    learn (the cost is one the price point has seen, or none was reported)."""
    seen = job.estimate.seen_cents
    learns = job.submitted.cost_cents is not None and (seen is None or job.cost > seen)
    return job.idempotency_key is None and job.key.budget_cents is None and not learns


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


async def _one_statement(runtime: Runtime, jobs: list[Job]) -> dict[int, Any]:
    """The batch's common holds and confirms in one statement (app/budgets/fastbatch.py): the results of
    the jobs it applied, by index. The others, and all of them when it did nothing (a budget line crossed,
    an error other than an outage), are for the transaction that follows."""
    confirms = [(i, j) for i, j in enumerate(jobs) if isinstance(j, ConfirmJob) and _common_confirm(j)]
    # A batch settles and releases before it holds, so that a hold sees the money they moved: a tenant
    # with a settle or release left to the transaction has its holds applied there too, after them.
    later = {
        j.tenant.id if isinstance(j, ConfirmJob) else j.prediction.tenant_id
        for j in jobs
        if isinstance(j, ReleaseJob) or (isinstance(j, ConfirmJob) and not _common_confirm(j))
    }
    holds = [
        (i, j) for i, j in enumerate(jobs) if isinstance(j, HoldJob) and _common_hold(j) and j.tenant.id not in later
    ]
    if not holds and not confirms:
        return {}
    settings = runtime.settings
    now = clock.now()
    predictions = [_new_prediction(job, 0, now) for _, job in holds]
    fast_holds = [
        fastbatch.FastHold(
            prediction_id=p.id,
            tenant_id=p.tenant_id,
            api_key_id=p.api_key_id,
            model_id=p.model_id,
            model_name=p.model_name or p.model_id,
            params=orjson.dumps(p.params).decode(),
            webhook_url=p.webhook_url,
            webhook_events=_json(p.webhook_events),
            meta=_json(p.meta),
            public_base_url=p.public_base_url,
            period_start=p.period_start,
            floor_cents=budgets_service.hold_cents(None, list(job.provider_prices)),
            table_cents=budgets_service.table_estimate(settings.price_table, *_point(job)),
            priced=job.answer_priced,
            resolution=_point(job)[1],
            duration_s=_point(job)[2],
        )
        for (_, job), p in zip(holds, predictions, strict=True)
    ]
    polls = {
        job.prediction.id: service.first_poll_at(now, job.submitted.estimated_time, settings.poll_interval_s)
        for _, job in confirms
    }
    fast_settles = [
        fastbatch.FastSettle(
            prediction_id=job.prediction.id,
            tenant_id=job.tenant.id,
            upstream_id=job.submitted.id,
            estimated_time=job.submitted.estimated_time,
            next_poll_at=polls[job.prediction.id],
            provider=job.provider,
            cost=job.cost,
            ref=_json(job.submitted.ref),
        )
        for _, job in confirms
    ]
    if runtime.ledger_connection is None:
        # A generic plan: the statement is the same for every batch, and planning it anew each time (a
        # custom plan, PostgreSQL's choice for its array parameters) cost about as much as running it.
        # Past a transaction pooler a session setting does not stay with the connection: none is made.
        generic = {} if runtime.settings.database_pooled else {"plan_cache_mode": "force_generic_plan"}
        runtime.ledger_connection = OwnConnection(runtime.sessions, generic)
    try:
        async with runtime.ledger_connection.use() as connection:
            applied = await fastbatch.apply(connection, fast_holds, fast_settles, now)
    except DatabaseUnavailable:
        raise
    except Exception:
        log.warning("one-statement batch failed: applied in a transaction instead", exc_info=True)
        return {}
    if not applied.go:
        return {}
    done: dict[int, Any] = {}
    for (index, job), prediction, amount, seen in zip(holds, predictions, applied.amounts, applied.seen, strict=True):
        if prediction.id not in applied.held:
            continue
        prediction.estimate_cents = amount
        if job.answer_priced:
            table_cents = budgets_service.table_estimate(settings.price_table, *_point(job))
            estimate = budgets_service.Estimate(max(table_cents, seen or 0), seen)
        else:
            estimate = budgets_service.Estimate(amount, None)
        done[index] = (prediction, estimate)
    for index, confirm in confirms:
        if confirm.prediction.id not in applied.confirmed:
            continue
        _confirmed(confirm, polls[confirm.prediction.id])
        done[index] = service.present_submit(
            confirm.prediction, f"{confirm.status_url_base}/{confirm.prediction.id}", extended=False
        )
    return done


def _confirmed(job: ConfirmJob, next_poll_at: datetime) -> None:
    """The caller's copy of a prediction fastbatch confirmed shows what its row says now."""
    prediction = job.prediction
    prediction.upstream_id = job.submitted.id
    prediction.status = PredictionStatus.PROCESSING
    prediction.estimated_time = job.submitted.estimated_time
    prediction.next_poll_at = next_poll_at
    prediction.provider = job.provider
    prediction.upstream_ref = job.submitted.ref
    budgets_movements.show_charged(prediction, job.cost)


def _point(job: HoldJob) -> tuple[str, str, int]:
    """The price point of a hold: (model, resolution, duration), defaults filled in."""
    request = job.request
    return (
        job.model_id,
        request.resolution or budgets_service.DEFAULT_RESOLUTION,
        request.duration or budgets_service.DEFAULT_DURATION_S,
    )


async def apply(runtime: Runtime, session: AsyncSession, jobs: list[Job]) -> list[Any]:
    """One batch of mixed jobs in the caller's transaction: per job, a hold's prediction (or its replay or
    refusal), a confirm's answer body, a release's whether it was released.

    In the lock order (app/budgets/movements.py, top): first the batch's own rows (the confirmed and
    released predictions' state, the price points learnt, the holds' Idempotency-Keys), then all of the
    money at once (move_batch), then new rows and the answers remembered."""
    holds = [(i, j) for i, j in enumerate(jobs) if isinstance(j, HoldJob)]
    confirms = [(i, j) for i, j in enumerate(jobs) if isinstance(j, ConfirmJob)]
    releases = [(i, j) for i, j in enumerate(jobs) if isinstance(j, ReleaseJob)]
    results: list[Any] = [None] * len(jobs)
    confirmed, settles = await _confirm_states(session, runtime, [j for _, j in confirms])
    released, giving_back = await service.reject_many(session, [(j.prediction, j.reason, j.key) for _, j in releases])
    held = await _claim_and_price(session, runtime, [j for _, j in holds])
    moved = await budgets_movements.move_batch(
        session, holds=[request for _, _, request in held.pending], settles=settles, releases=giving_back
    )
    hold_results = await _insert_held(session, [j for _, j in holds], held, moved.refusals)
    for tenant, percent in moved.crossed:
        usage = await budgets_service.tenant_usage(session, tenant)
        await webhooks_service.enqueue_budget_threshold(session, tenant, percent, usage)
    bodies = await _remember_answers(session, [j for _, j in confirms], confirmed)
    forgotten = [
        {"b_tenant": job.prediction.tenant_id, "b_key": job.idempotency_key}
        for _, job in releases
        if job.idempotency_key is not None
    ]
    if forgotten:
        await session.execute(_FORGET, forgotten)
    for (index, _), result in zip(holds, hold_results, strict=True):
        results[index] = result
    for (index, _), body in zip(confirms, bodies, strict=True):
        results[index] = body
    for index, job in releases:
        results[index] = job.prediction.id in released
    return results


async def _remember_answers(
    session: AsyncSession, jobs: list[ConfirmJob], confirmed: list[Prediction]
) -> list[dict[str, Any]]:
    """The confirms' answer bodies, stored as their Idempotency-Keys' answers."""
    bodies = [
        service.present_submit(p, f"{job.status_url_base}/{p.id}", extended=False)
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


ABANDONED = "the client went away before the upstream confirmed the prediction"
# Releases of abandoned holds in flight: a task needs a strong reference until it is done.
_releasing: set[asyncio.Task[None]] = set()


def _ignore(_result: object) -> None:
    """on_abandoned for a writer job that needs nothing more once applied (its caller is gone)."""


def _abandoned_hold(
    runtime: Runtime, key: ApiKey, idempotency_key: str | None, held: _Held | service.SubmitResult
) -> None:
    """A hold committed for a caller that went away while its batch ran: give it back."""
    if not isinstance(held, service.SubmitResult):
        _release_abandoned(runtime, held[0], key, idempotency_key)


def _release_abandoned(
    runtime: Runtime, prediction: Prediction, key: ApiKey, idempotency_key: str | None
) -> asyncio.Task[None]:
    task = asyncio.create_task(_release_quietly(runtime, ReleaseJob(prediction, key, ABANDONED, idempotency_key)))
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)
    return task


async def _release_quietly(runtime: Runtime, job: ReleaseJob) -> None:
    try:
        await _writer(runtime).submit(job, on_abandoned=_ignore)
    except Exception as exc:  # recovery releases it later (submit_recovery_s)
        log.warning(
            "abandoned hold not released yet",
            extra={"prediction_id": job.prediction.id, "error_type": type(exc).__name__},
        )


async def confirm_until_recorded(runtime: Runtime, job: ConfirmJob) -> dict[str, Any]:
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
            body: dict[str, Any] = await _writer(runtime).submit(job, on_abandoned=_ignore)
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
) -> service.SubmitResult | None:
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
        raise service.IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request body or model. "
            "Use a new key for a new request.",
            field="Idempotency-Key",
        )
    if existing.response is None:
        raise service.IdempotencyKeyInFlight(
            "A request with this Idempotency-Key is still in flight. Retry in a moment to get its answer.",
            headers={"Retry-After": retry_after_value(1)},
        )
    scheduled = await session.scalar(select(Prediction.next_poll_at).where(Prediction.id == existing.prediction_id))
    return service.SubmitResult(
        existing.response, replayed=True, prediction_id=existing.prediction_id or "", next_poll_at=scheduled
    )


async def _forget_idempotency_key(session: AsyncSession, tenant_id: str, idempotency_key: str) -> None:
    """Only successes are remembered: after a failure the caller may retry with the same key."""
    await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == idempotency_key)
    )


@dataclass
class _Claimed:
    """A batch's holds after their Idempotency-Keys were claimed and their prices read: the answers known
    already (a replay, a refusal) by index, and (index, prediction with its estimate, hold request) for the
    rest, to be held."""

    done: dict[int, _Held | service.SubmitResult | BaseException]
    pending: list[tuple[int, _Held, budgets_movements.HoldRequest]]


async def _claim_and_price(session: AsyncSession, runtime: Runtime, jobs: list[HoldJob]) -> _Claimed:
    settings = runtime.settings
    now = clock.now()
    done: dict[int, _Held | service.SubmitResult | BaseException] = {}
    # By (tenant, key): two batches claiming the same keys wait for each other in one order (lock order:
    # app/budgets/movements.py); the same key twice in a batch keeps its arrival order.
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
            done[index] = exc
            continue
        if replay is not None:
            done[index] = replay
    estimates: dict[tuple[str, str, int], budgets_service.Estimate] = {}
    retry_after_s = max(1, round(settings.poll_interval_s))
    pending: list[tuple[int, _Held, budgets_movements.HoldRequest]] = []
    for index, job in enumerate(jobs):
        if index in done:
            continue
        if job.answer_priced:
            resolution = job.request.resolution or budgets_service.DEFAULT_RESOLUTION
            duration = job.request.duration or budgets_service.DEFAULT_DURATION_S
            point = (job.model_id, resolution, duration)
            if point not in estimates:
                estimates[point] = await budgets_service.price_estimate(session, settings.price_table, *point)
            estimate = estimates[point]
            cents = budgets_service.hold_cents(estimate.cents, list(job.provider_prices))
        else:
            # Every candidate is priced by the file: nothing to estimate or learn.
            cents = budgets_service.hold_cents(None, list(job.provider_prices))
            estimate = budgets_service.Estimate(cents, None)
        prediction = _new_prediction(job, cents, now)
        request = budgets_movements.HoldRequest(
            tenant=job.tenant,
            key=job.key,
            hold=service.hold_of(prediction, job.key),
            amount=cents,
            slot_retry_after_s=retry_after_s,
        )
        pending.append((index, (prediction, estimate), request))
    return _Claimed(done, pending)


async def _insert_held(
    session: AsyncSession, jobs: list[HoldJob], claimed: _Claimed, refusals: list[AppError | None]
) -> list[_Held | service.SubmitResult | BaseException]:
    """The admitted predictions inserted in one statement; the refused ones' Idempotency-Keys freed. Each
    job's answer: its prediction, a replay or its refusal."""
    results = dict(claimed.done)
    admitted = []
    for (index, held, _), refusal in zip(claimed.pending, refusals, strict=True):
        if refusal is None:
            results[index] = held
            admitted.append(_row(held[0]))
            continue
        metrics.BUDGET_REFUSALS.labels(code=refusal.code).inc()
        results[index] = refusal
        if jobs[index].idempotency_key is not None:
            await _forget_idempotency_key(session, jobs[index].tenant.id, jobs[index].idempotency_key or "")
    if admitted:
        # A Core INSERT of many rows (no unit of work): the objects stay in memory for their requests.
        await prebuilt.execute_many(session, _INSERT, admitted)
    return [results[i] for i in range(len(jobs))]


# Built as the ORM builds an object it loaded, its attributes set directly (no attribute events): these
# objects are never added to a session (their INSERT is Core), and the instrumented __init__ cost about
# 57 µs a submit, more than the rest of the hold. ClassManager.new_instance is SQLAlchemy's own way to
# make an instance without __init__.
_PREDICTIONS = inspect(Prediction).class_manager


def _new_prediction(job: HoldJob, estimate_cents: int, now: datetime) -> Prediction:
    prediction: Prediction = _PREDICTIONS.new_instance()
    prediction.__dict__.update(
        id=job.prediction_id,
        tenant_id=job.tenant.id,
        api_key_id=job.key.id,
        model_id=job.model_id,
        model_name=service.MODEL_NAMES.get(job.model_id, job.model_id),
        status=PredictionStatus.SUBMITTING,
        params=job.request.upstream_body(),
        webhook_url=job.request.webhook,
        public_base_url=job.public_base_url,
        webhook_events=job.request.webhook_events_filter,
        meta=job.request.metadata,
        **budgets_movements.new_hold_columns(job.tenant, estimate_cents, now),
        holds_provider_slot=False,
        created_at=now,
        poll_count=0,
        poll_failures=0,
    )
    return prediction


async def _confirm_states(
    session: AsyncSession, runtime: Runtime, jobs: list[ConfirmJob]
) -> tuple[list[Prediction], list[budgets_movements.Settle]]:
    """What the vendor accepted, recorded for a batch: the predictions start processing (one statement,
    fenced on "submitting") and the prices seen are learnt. The confirmed prediction of each job, and the
    settles to apply (move_batch charges each prediction once, whoever confirms it)."""
    if not jobs:
        return [], []
    now = clock.now()
    states = {
        job.prediction.id: dict(
            upstream_id=job.submitted.id,
            status=PredictionStatus.PROCESSING,
            estimated_time=job.submitted.estimated_time,
            next_poll_at=service.first_poll_at(now, job.submitted.estimated_time, runtime.settings.poll_interval_s),
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
    settles: list[budgets_movements.Settle] = []
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
            budgets_movements.Settle(
                job.tenant, service.hold_of(prediction, job.key), prediction.estimate_cents, cost, prediction
            )
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
    return confirmed, settles


async def _confirm_late(
    session: AsyncSession, job: ConfirmJob, state: dict[str, Any]
) -> tuple[Prediction, budgets_movements.Settle | None]:
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
    charge = budgets_movements.Settle(
        job.tenant, service.hold_of(prediction), 0, job.cost, prediction, late=True, late_slot=prediction.holds_slot
    )
    return prediction, charge
