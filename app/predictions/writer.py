"""The ledger writer: one per process. A submit hands each of its money steps to it (the hold before the
provider is called, the settle once one accepted, the release when none did) and awaits it; the writer
applies everything that queued meanwhile as one batch: on PostgreSQL its common jobs in one statement
that commits on its own (app/predictions/onestatement.py), the rest in one transaction, with multi-row
statements where the rows are alike. The money rules stay in app/budgets.

Why one writer for all three steps: holds and settles of the same tenant lock the same counter row, so
two writers (one per step) queued behind each other's commits; one writer takes both in one transaction
(bench/FINDINGS.md, issue 25)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import cache, partial
from typing import Any

from sqlalchemy import String, bindparam, delete, insert, inspect, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.core import clock, metrics, prebuilt
from app.core.batching import Batcher
from app.core.database import (
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
from app.predictions import onestatement, service
from app.predictions.jobs import ConfirmJob as ConfirmJob
from app.predictions.jobs import Held, Job, new_prediction
from app.predictions.jobs import HoldJob as HoldJob
from app.predictions.jobs import ReleaseJob as ReleaseJob
from app.predictions.models import IdempotencyKey, Prediction, PredictionStatus
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
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


async def hold(runtime: Runtime, job: HoldJob) -> Held | service.SubmitResult:
    """Claim the idempotency key, pass the limits and hold the estimate, in the ledger writer's next
    batch: committed before any provider is called, so concurrent requests and other replicas see it.
    The prediction held, or a replay of an earlier answer; raises the refusal. A caller that goes away
    meanwhile (its task cancelled) has its hold given back as soon as it commits."""
    abandoned = partial(_abandoned_hold, runtime, job.key, job.idempotency_key)
    result: Held | service.SubmitResult = await _writer(runtime).submit(job, on_abandoned=abandoned)
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


# ---------------------------------------------------------------- the ledger writer
#
# The jobs it takes are app/predictions/jobs.py's; on PostgreSQL a batch's common jobs go in one
# statement (app/predictions/onestatement.py), the rest in one transaction here.


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
    """The batch: its common jobs in one statement (onestatement.apply: one step on SQLite), the rest in
    one transaction. If that fails for a reason other than an outage (a deadlock, a bug one job triggers),
    each job runs alone, so one job's failure is its caller's alone; and a failure of the transaction
    (an outage included) is only its own jobs' callers': the jobs the statement committed are done."""
    _observe(jobs)
    results: list[Any] = [None] * len(jobs)
    done = await onestatement.apply(runtime, jobs)
    for index, result in done.items():
        results[index] = result
    rest = [i for i in range(len(jobs)) if i not in done]
    if rest:
        for index, result in zip(rest, await _in_one_transaction(runtime, [jobs[i] for i in rest]), strict=True):
            results[index] = result
    return results


async def _in_one_transaction(runtime: Runtime, jobs: list[Job]) -> list[Any]:
    """Each job's result, or the exception that is its caller's: never raises an Exception, so what the
    one statement committed beside these jobs reaches its callers whatever happens here."""
    try:
        async with transaction(runtime.sessions) as session:
            return await apply(runtime, session, jobs)
    except DatabaseUnavailable as exc:
        return [exc] * len(jobs)
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
    results: list[Any] = []
    for job in jobs:
        try:
            async with transaction(runtime.sessions) as session:
                results += await apply(runtime, session, [job])
        except Exception as exc:
            results.append(exc)
    return results


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
    runtime: Runtime, key: ApiKey, idempotency_key: str | None, held: Held | service.SubmitResult
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

    done: dict[int, Held | service.SubmitResult | BaseException]
    pending: list[tuple[int, Held, budgets_movements.HoldRequest]]


async def _claim_and_price(session: AsyncSession, runtime: Runtime, jobs: list[HoldJob]) -> _Claimed:
    settings = runtime.settings
    now = clock.now()
    done: dict[int, Held | service.SubmitResult | BaseException] = {}
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
    pending: list[tuple[int, Held, budgets_movements.HoldRequest]] = []
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
        prediction = new_prediction(job, cents, now)
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
) -> list[Held | service.SubmitResult | BaseException]:
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
