"""The ledger writer's common jobs in one statement on PostgreSQL (app/budgets/fastbatch.py), or in one step
on SQLite's connection thread (app/budgets/sqlitebatch.py): holds with no Idempotency-Key, limit or key
budget, and the confirms that remember no answer and learn no price.
Everything else in a batch, and the whole batch when this does nothing, goes to the writer's
transaction (app/predictions/writer.py)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets import fastbatch, sqlitebatch
from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.core import clock
from app.core.database import OwnConnection
from app.core.errors import DatabaseUnavailable
from app.core.settings import Settings
from app.predictions import service
from app.predictions.jobs import ConfirmJob, HoldJob, Job, ReleaseJob, new_prediction, point
from app.predictions.models import Prediction, PredictionStatus
from app.runtime import Runtime

log = logging.getLogger("vidgate.predictions")


# The writer connection's settings. A generic plan: the statement is the same for every batch, and
# planning it anew each time (a custom plan, PostgreSQL's choice for its array parameters) cost about as
# much as running it. But that plan is made once, at the connection's first batch, from the tables' sizes
# then: on a new database predictions is empty, a sequential scan looks cheapest, and the plan kept it
# while the table grew (9 ms per batch at 14,000 rows, the writer's whole cycle, and growing). Without
# sequential scans the plan finds rows by their keys whatever the sizes were when it was made
# (tests/test_writer_plan.py).
GENERIC_PLAN = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}


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


async def apply(runtime: Runtime, batch: list[Job]) -> dict[int, Any]:
    """The batch's common holds and confirms in one statement (app/budgets/fastbatch.py): the results of
    the jobs it applied, by index. The others, and all of them when it did nothing (a budget line crossed,
    an error other than an outage), are for the transaction that follows."""
    confirms = [(i, j) for i, j in enumerate(batch) if isinstance(j, ConfirmJob) and _common_confirm(j)]
    # A batch settles and releases before it holds, so that a hold sees the money they moved: a tenant
    # with a settle or release left to the transaction has its holds applied there too, after them.
    later = {
        j.tenant.id if isinstance(j, ConfirmJob) else j.prediction.tenant_id
        for j in batch
        if isinstance(j, ReleaseJob) or (isinstance(j, ConfirmJob) and not _common_confirm(j))
    }
    holds = [
        (i, j) for i, j in enumerate(batch) if isinstance(j, HoldJob) and _common_hold(j) and j.tenant.id not in later
    ]
    if not holds and not confirms:
        return {}
    settings = runtime.settings
    now = clock.now()
    sqlite = runtime.engine.dialect.name == "sqlite"
    if sqlite and not isinstance(runtime.sessions.kw.get("bind"), AsyncEngine):
        return {}  # the tests' outer transaction: SQLite cannot begin one of its own inside it
    if runtime.ledger_connection is None:
        # Past a transaction pooler a session setting does not stay with the connection: none is made
        # (each batch is then planned anew, which costs more but follows the tables as they grow).
        generic = {} if runtime.settings.database_pooled or sqlite else GENERIC_PLAN
        runtime.ledger_connection = OwnConnection(runtime.sessions, generic)
    try:
        # Built inside the try: a job that cannot be put into the statement (a bug, a cost that cannot be
        # told) sends the batch to the transaction, whose one-job fallback keeps the error its caller's.
        predictions, fast_holds, polls, fast_settles = _inputs(settings, holds, confirms, now)
        if sqlite:
            applied = await runtime.ledger_connection.run_in_thread(sqlitebatch.batch(fast_holds, fast_settles, now))
        else:
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
            table_cents = budgets_service.table_estimate(settings.price_table, *point(job))
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


def _inputs(
    settings: Settings, holds: list[tuple[int, HoldJob]], confirms: list[tuple[int, ConfirmJob]], now: datetime
) -> tuple[list[Prediction], list[fastbatch.FastHold], dict[str, datetime], list[fastbatch.FastSettle]]:
    """The statement's rows: the holds' new predictions and their money, the confirms' first polls and
    charges."""
    predictions = [new_prediction(job, 0, now) for _, job in holds]
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
            table_cents=budgets_service.table_estimate(settings.price_table, *point(job)),
            priced=job.answer_priced,
            resolution=point(job)[1],
            duration_s=point(job)[2],
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
    return predictions, fast_holds, polls, fast_settles


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
