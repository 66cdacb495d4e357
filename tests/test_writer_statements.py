"""What one ledger writer batch costs the database, for a batch of 1 and of 32 submits (issue 25): on
PostgreSQL the common holds, and the common settles, are one statement that commits on its own
(app/budgets/fastbatch.py); on SQLite they are one step on the writer connection's thread
(app/budgets/sqlitebatch.py), a transaction whose statements do not grow with it. Counted at the driver:
every statement SQLAlchemy or app/core/prebuilt.py sends, and every commit (a COMMIT, or a statement on
an AUTOCOMMIT connection); for SQLite's step, its statements as `vidgate_db_statements_total` counts them
and the COMMITs its connection runs."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, func, select

from app.budgets import service as budgets_service
from app.core import clock
from app.core.database import transaction
from app.core.errors import DatabaseUnavailable
from app.core.ids import new_id
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.schemas import UpstreamSubmitted
from tests.conftest import TEST_DB, Api, valid_body

MODEL = "ltx-2-19b"


@dataclass
class Seen:
    statements: list[str] = field(default_factory=list)
    commits: int = 0
    engine_executes: int = 0  # everything SQLAlchemy sent, its BEGINs included
    step_statements: int = 0  # SQLite's one step (app/budgets/sqlitebatch.py)
    step_commits: int = 0


def writer_sqlite3(runtime: Runtime) -> sqlite3.Connection | None:
    """The sqlite3 connection the ledger writer keeps for its one step, once it has one."""
    own = runtime.ledger_connection
    kept = own._connection if own is not None else None
    if kept is None or kept.sync_connection is None:
        return None
    connection: sqlite3.Connection = kept.sync_connection.connection.driver_connection._conn
    return connection


def sent_statements() -> float:
    return REGISTRY.get_sample_value("vidgate_db_statements_total") or 0.0


@contextmanager
def counted(runtime: Runtime) -> Iterator[Seen]:
    seen = Seen()

    def statement(conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        seen.engine_executes += 1
        if sql.lstrip().upper().startswith(("BEGIN", "SAVEPOINT", "RELEASE SAVEPOINT")):
            return
        seen.statements.append(sql)
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            seen.commits += 1

    def commit(_conn: Any) -> None:
        seen.commits += 1

    def traced(sql: str) -> None:  # on the step's thread
        seen.step_commits += sql == "COMMIT"

    engine = runtime.engine.sync_engine
    sent = sent_statements()
    step = writer_sqlite3(runtime) if TEST_DB == "sqlite" else None
    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    if step is not None:
        step.set_trace_callback(traced)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
        if step is not None:
            step.set_trace_callback(None)
        seen.step_statements = int(sent_statements() - sent) - seen.engine_executes


async def caller(api: Api, runtime: Runtime) -> tuple[Tenant, ApiKey]:
    tenant = await api.tenant(budgetCents=1_000_000)
    return await caller_of(runtime, tenant.id)


async def caller_of(runtime: Runtime, tenant_id: str) -> tuple[Tenant, ApiKey]:
    async with transaction(runtime.sessions) as session:
        tenant_row = await session.get(Tenant, tenant_id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant_id))
        assert tenant_row is not None and key_row is not None
        return tenant_row, key_row


def hold_jobs(tenant: Tenant, key: ApiKey, n: int) -> list[predictions_writer.HoldJob]:
    request = GenerateRequest.model_validate(valid_body())
    fingerprint = predictions_service.request_fingerprint(MODEL, request)
    return [
        predictions_writer.HoldJob(tenant, key, MODEL, request, new_id("pred"), None, fingerprint) for _ in range(n)
    ]


def confirm_jobs(tenant: Tenant, key: ApiKey, held: list[Any]) -> list[predictions_writer.ConfirmJob]:
    return [
        predictions_writer.ConfirmJob(
            tenant,
            key,
            prediction,
            estimate,
            UpstreamSubmitted.model_validate(
                {"id": new_id("up"), "status": "processing", "costCents": 9, "estimatedTime": "5-20s"}
            ),
            None,
            "http://gw/api/v1/predictions",
        )
        for prediction, estimate in held
    ]


async def one_batch(runtime: Runtime, jobs: list[Any]) -> tuple[list[Any], Seen]:
    """The jobs handed to the process's writer at once: one batch (the writer takes everything queued)."""
    writer = predictions_writer._writer(runtime)
    with counted(runtime) as seen:
        results = await asyncio.gather(*(writer.submit(job) for job in jobs))
    return list(results), seen


@pytest.mark.parametrize("size", [1, 32])
async def test_a_batch_of_holds_then_of_settles_costs_a_fixed_number_of_statements(
    live_api: Api, live_runtime: Runtime, size: int
) -> None:
    tenant, key = await caller(live_api, live_runtime)
    # One batch before, so that the price point is known and the settles below learn nothing.
    warm, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 1))
    await one_batch(live_runtime, confirm_jobs(tenant, key, warm))

    held, holding = await one_batch(live_runtime, hold_jobs(tenant, key, size))
    bodies, settling = await one_batch(live_runtime, confirm_jobs(tenant, key, held))

    assert all(isinstance(h, tuple) for h in held), held
    assert [b["status"] for b in bodies] == ["processing"] * size
    if TEST_DB == "postgresql":
        assert (len(holding.statements), holding.commits) == (1, 1), holding.statements
        assert (len(settling.statements), settling.commits) == (1, 1), settling.statements
    else:
        # Nothing through SQLAlchemy. The step: BEGIN IMMEDIATE, the price point, the counter, its UPDATE,
        # the predictions, the ledger rows; then BEGIN IMMEDIATE, the predictions still waiting, the
        # counter, the confirms, its UPDATE, the ledger rows, the day. One COMMIT each.
        assert holding.statements == settling.statements == []
        assert (holding.step_statements, holding.step_commits) == (6, 1)
        assert (settling.step_statements, settling.step_commits) == (7, 1)
    async with transaction(live_runtime.sessions) as session:
        charged = await session.scalar(
            select(func.sum(Prediction.charged_cents)).where(Prediction.tenant_id == tenant.id)
        )
        assert charged == 9 * (size + 1)
        assert await budgets_service.verify_ledger(session) == []


async def test_holds_and_settles_in_one_batch_are_one_statement(live_api: Api, live_runtime: Runtime) -> None:
    """The writer takes holds and settles together: one statement (one step on SQLite) holds the new ones
    and settles the others."""
    tenant, key = await caller(live_api, live_runtime)
    warm, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 1))
    await one_batch(live_runtime, confirm_jobs(tenant, key, warm))
    held, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 16))

    results, seen = await one_batch(live_runtime, [*confirm_jobs(tenant, key, held), *hold_jobs(tenant, key, 16)])

    assert [r["status"] for r in results[:16]] == ["processing"] * 16
    assert all(isinstance(r, tuple) for r in results[16:])
    if TEST_DB == "postgresql":
        assert (len(seen.statements), seen.commits) == (1, 1), seen.statements
    else:
        assert (seen.statements, seen.step_commits) == ([], 1)
    async with transaction(live_runtime.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []


async def test_a_failed_transaction_reaches_only_its_own_jobs_callers(
    live_api: Api, live_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose common hold the one statement committed, and whose hold with an Idempotency-Key
    (the transaction's) meets an outage: the first caller has its prediction, only the second the error.
    Before, both got the error, and the first one's retry would have held its money twice."""
    tenant, key = await caller(live_api, live_runtime)
    await one_batch(live_runtime, hold_jobs(tenant, key, 1))  # the tenant's counter: the statement needs it
    common, keyed = hold_jobs(tenant, key, 2)
    keyed = dataclasses.replace(keyed, idempotency_key="idem-" + new_id("k"))

    async def outage(*_: Any) -> list[Any]:
        raise DatabaseUnavailable()

    monkeypatch.setattr(predictions_writer, "apply", outage)
    writer = predictions_writer._writer(live_runtime)
    results = await asyncio.gather(writer.submit(common), writer.submit(keyed), return_exceptions=True)

    assert isinstance(results[0], tuple) and results[0][0].id == common.prediction_id, results
    assert isinstance(results[1], DatabaseUnavailable), results
    async with transaction(live_runtime.sessions) as session:
        stored = await session.get(Prediction, common.prediction_id)
        assert stored is not None and stored.status == "submitting"
        assert await session.get(Prediction, keyed.prediction_id) is None
        assert await budgets_service.verify_ledger(session) == []


async def test_a_job_the_statement_cannot_take_fails_its_caller_alone(live_api: Api, live_runtime: Runtime) -> None:
    """A confirm whose charge cannot be told (no cost in the answer, no price in the file: a bug the
    providers file's checks keep out) beside a good one: the good one is settled, the bad one's caller
    alone gets the error. Before, the statement's inputs were built outside its fallback, and the
    error reached every job of the batch, the good settle included."""
    tenant, key = await caller(live_api, live_runtime)
    held, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 2))
    good, bad = confirm_jobs(tenant, key, held)
    bad = dataclasses.replace(bad, submitted=bad.submitted.model_copy(update={"cost_cents": None}), price_cents=None)

    writer = predictions_writer._writer(live_runtime)
    results = await asyncio.gather(writer.submit(good), writer.submit(bad), return_exceptions=True)

    assert isinstance(results[0], dict) and results[0]["status"] == "processing", results
    assert isinstance(results[1], ValueError), results
    async with transaction(live_runtime.sessions) as session:
        settled = await session.get(Prediction, good.prediction.id)
        assert settled is not None and settled.charged_cents == 9
        assert await budgets_service.verify_ledger(session) == []


async def test_a_settle_of_the_last_period_beside_a_hold_of_a_new_one_is_one_transaction(
    live_api: Api, live_runtime: Runtime
) -> None:
    """At a period's roll-over a batch can settle a hold of the day that ended and hold in the day that
    began, for one tenant with a budget. Both in the batch's one transaction (on PostgreSQL the tenant's
    rate limit and the Idempotency-Key send both there). Before, the threshold check looked up the cost
    of the new day, which had none: a KeyError, the transaction rolled back and every job redone alone."""
    started = clock.now()
    day_end = started.replace(hour=23, minute=59, second=59, microsecond=0)
    try:
        clock.shift_to(day_end)
        tenant = await live_api.tenant(budgetCents=100_000, budgetPeriod="day", ratePerMinute=10_000)
        tenant_row, key = await caller_of(live_runtime, tenant.id)
        held, _ = await one_batch(live_runtime, hold_jobs(tenant_row, key, 1))
        clock.shift_to(day_end + timedelta(seconds=2))
        (confirm,) = confirm_jobs(tenant_row, key, held)
        confirm = dataclasses.replace(confirm, idempotency_key="idem-" + new_id("k"))
        (hold,) = hold_jobs(tenant_row, key, 1)
        results, seen = await one_batch(live_runtime, [confirm, hold])
    finally:
        clock.reset()

    assert isinstance(results[0], dict) and results[0]["status"] == "processing", results
    assert isinstance(results[1], tuple), results
    assert seen.commits == 1, seen.statements
    async with transaction(live_runtime.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []


async def test_slots_given_back_and_counted_in_one_batch_change_tenants_in_order(
    live_api: Api, live_runtime: Runtime
) -> None:
    """A batch that gives a slot back (a release) for one tenant and counts one (a late confirm, charged
    whatever the limit) for another changes the tenants' rows in tenant order, the lock order every writer
    keeps (app/budgets/movements.py, top). Before, the slots given back went first: tenant B before A, a
    deadlock with a batch that took them in order."""
    rows = [await caller_of(live_runtime, (await live_api.tenant(maxConcurrent=5)).id) for _ in range(2)]
    (late_tenant, late_key), (released_tenant, released_key) = sorted(rows, key=lambda row: row[0].id)
    (late_held,), _ = await one_batch(live_runtime, hold_jobs(late_tenant, late_key, 1))
    (released_held,), _ = await one_batch(live_runtime, hold_jobs(released_tenant, released_key, 1))
    # Recovery gave the first one up; its vendor's answer comes only now: a late confirm, its slot counted.
    await predictions_writer.release(live_runtime, late_held[0], late_key, "recovered", None)
    (late_confirm,) = confirm_jobs(late_tenant, late_key, [late_held])
    release = predictions_writer.ReleaseJob(released_held[0], released_key, "no provider", None)

    changed: list[str] = []

    def slots(_conn: Any, _cursor: Any, sql: str, _params: Any, context: Any, _many: bool) -> None:
        if sql.lstrip().upper().startswith("UPDATE TENANTS SET IN_FLIGHT"):
            changed.extend(p["b_tenant"] for p in context.compiled_parameters if p.get("b_n"))

    engine = live_runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", slots)
    try:
        results, _ = await one_batch(live_runtime, [release, late_confirm])
    finally:
        event.remove(engine, "before_cursor_execute", slots)

    assert results[0] is True and results[1]["status"] == "processing", results
    assert changed == [late_tenant.id, released_tenant.id], changed
    async with transaction(live_runtime.sessions) as session:
        in_flight = {
            t.id: t.in_flight
            for t in (await session.scalars(select(Tenant).where(Tenant.id.in_([late_tenant.id, released_tenant.id]))))
        }
        assert in_flight == {late_tenant.id: 1, released_tenant.id: 0}
        assert await budgets_service.verify_ledger(session) == []
