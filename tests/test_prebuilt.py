"""Statements run on the driver (app/core/prebuilt.py) behave as SQLAlchemy's execution of them: inside the
caller's transaction (even as its first statement), with the same rows, seen by the engine's cursor events,
and failing with SQLAlchemy's errors. On SQLite they are SQLAlchemy's execution."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import bindparam, event, func, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets.models import PricePoint
from app.core import prebuilt
from app.core.database import create_engine, create_sessionmaker, table_of, transaction
from app.upstream.simulator import SimState
from tests.conftest import TEST_DB, Api, eventually, valid_body

_points = table_of(PricePoint)
_INSERT = insert(_points)
_READ = select(_points).where(_points.c.model_id == bindparam("b_model")).order_by(_points.c.duration_s)
# A bind name SQLAlchemy escapes for the paramstyles that name parameters in the SQL.
_READ_DOTTED = select(_points).where(_points.c.model_id == bindparam("b.model")).order_by(_points.c.duration_s)
_READ_CENTS = select(_points.c.max_seen_cents).where(_points.c.model_id == bindparam("b_model"))
_SLEEP = select(func.pg_sleep(bindparam("b_s")).label("slept"))

postgresql_only = pytest.mark.skipif(TEST_DB != "postgresql", reason="statements run on the driver on PostgreSQL")


def _row(model: str, duration: int, cents: int) -> dict[str, Any]:
    return dict(
        model_id=model,
        resolution="480p",
        duration_s=duration,
        max_seen_cents=cents,
        updated_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


async def test_a_first_statement_belongs_to_the_transaction_that_then_rolls_back(engine: AsyncEngine) -> None:
    sessions = create_sessionmaker(engine)
    model = f"m-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError):
        async with transaction(sessions) as session:
            await prebuilt.execute_many(session, _INSERT, [_row(model, 5, 10)])
            raise RuntimeError("roll it back")
    async with transaction(sessions) as session:
        assert await prebuilt.fetch(session, _READ, {"b_model": model}) == []


async def test_rows_are_sqlalchemys_rows(engine: AsyncEngine) -> None:
    sessions = create_sessionmaker(engine)
    model = f"m-{uuid.uuid4().hex[:8]}"
    async with transaction(sessions) as session:
        await prebuilt.execute_many(session, _INSERT, [_row(model, 5, 10)])
        await prebuilt.execute_many(session, _INSERT, [_row(model, 10, 20), _row(model, 15, 30)])
    async with transaction(sessions) as session:
        ours = await prebuilt.fetch(session, _READ, {"b_model": model})
        theirs = (await session.execute(_READ, {"b_model": model})).all()
    assert [tuple(r) for r in ours] == [tuple(r) for r in theirs]
    assert [r.max_seen_cents for r in ours] == [10, 20, 30]
    assert ours[0].updated_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert ours[0].updated_at.tzinfo is not None


async def test_every_statement_reaches_the_cursor_events(engine: AsyncEngine) -> None:
    sessions = create_sessionmaker(engine)
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip().upper().startswith("BEGIN"):
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        async with transaction(sessions) as session:
            await prebuilt.fetch(session, _READ, {"b_model": "none"})
            await prebuilt.execute_many(session, _INSERT, [_row(f"m-{uuid.uuid4().hex[:8]}", 5, 1)])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert len(seen) == 2


async def test_a_failing_statement_raises_sqlalchemys_error_and_the_pool_goes_on(engine: AsyncEngine) -> None:
    sessions = create_sessionmaker(engine)
    model = f"m-{uuid.uuid4().hex[:8]}"
    async with transaction(sessions) as session:
        await prebuilt.execute_many(session, _INSERT, [_row(model, 5, 10)])
    with pytest.raises(sa_exc.IntegrityError):
        async with transaction(sessions) as session:
            await prebuilt.execute_many(session, _INSERT, [_row(model, 5, 99)])
    async with transaction(sessions) as session:
        rows = await prebuilt.fetch(session, _READ, {"b_model": model})
    assert [r.max_seen_cents for r in rows] == [10]


async def test_a_write_on_a_bare_connection_is_committed_by_its_commit(engine: AsyncEngine) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    async with engine.connect() as connection:
        await prebuilt.execute_many(connection, _INSERT, [_row(model, 5, 10)])
        await connection.commit()
    async with transaction(create_sessionmaker(engine)) as session:
        rows = await prebuilt.fetch(session, _READ, {"b_model": model})
    assert [r.max_seen_cents for r in rows] == [10]


async def test_bind_names_that_sqlalchemy_escapes(engine: AsyncEngine) -> None:
    sessions = create_sessionmaker(engine)
    model = f"m-{uuid.uuid4().hex[:8]}"
    async with transaction(sessions) as session:
        await prebuilt.execute_many(session, _INSERT, [_row(model, 5, 10)])
        rows = await prebuilt.fetch(session, _READ_DOTTED, {"b.model": model})
    assert [r.max_seen_cents for r in rows] == [10]


@postgresql_only
async def test_a_task_cancelled_mid_statement_gives_up_its_connection(engine: AsyncEngine) -> None:
    """As SQLAlchemy does on an exit exception: the connection is invalidated (its state is unknown), the
    cancellation goes on unchanged, and the pool serves the next unit of work."""
    sessions = create_sessionmaker(engine)
    sleeping = asyncio.Event()
    invalidated: list[BaseException | None] = []

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "pg_sleep" in statement:
            sleeping.set()

    def on_invalidate(_dbapi_connection: Any, _record: Any, error: BaseException | None) -> None:
        invalidated.append(error)

    async def sleep() -> None:
        async with transaction(sessions) as session:
            await prebuilt.fetch(session, _SLEEP, {"b_s": 600})

    event.listen(engine.sync_engine, "before_cursor_execute", on_statement)
    event.listen(engine.sync_engine.pool, "invalidate", on_invalidate)
    try:
        task = asyncio.create_task(sleep())
        await sleeping.wait()  # set just before the statement is sent: the task is now waiting inside it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", on_statement)
        event.remove(engine.sync_engine.pool, "invalidate", on_invalidate)
    assert len(invalidated) == 1
    assert isinstance(invalidated[0], asyncio.CancelledError)
    async with transaction(sessions) as session:
        assert await prebuilt.fetch(session, _READ, {"b_model": "none"}) == []


@postgresql_only
async def test_a_plan_is_compiled_for_the_dialect_that_runs_it(engine: AsyncEngine, database_url: str) -> None:
    other = create_engine(database_url, pool_size=1)
    try:
        for each in (engine, other):
            async with transaction(create_sessionmaker(each)) as session:
                assert await prebuilt.fetch(session, _READ_CENTS, {"b_model": "none"}) == []
    finally:
        await other.dispose()
    dialects = {id(entry[-1].compiled.dialect) for entry in prebuilt._plans.values() if entry[0] is _READ_CENTS}
    assert dialects == {id(engine.dialect), id(other.dialect)}


@postgresql_only
async def test_the_hot_statements_take_the_fast_path(live_api: Api, worker: Any, sim: SimState) -> None:
    """A submit (Idempotency-Key, a key with a budget of its own), its replay, a GET, a submit the
    vendor refuses and the poller's completion: every statement they hand to app/core/prebuilt.py runs
    on the driver. A SQLAlchemy upgrade that makes one fall back (only slower, otherwise unnoticed)
    fails here."""
    prebuilt.fallbacks.clear()
    before = prebuilt.fast_runs()
    tenant = await live_api.tenant(budgetCents=1_000)
    raw_key = await live_api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json={"budgetCents": 500})
    assert raw_key.status_code == 201, raw_key.text
    tenant.key = raw_key.json()["key"]
    submitted = await tenant.submit(**{"Idempotency-Key": "fast"})
    assert submitted.status_code == 200, submitted.text
    assert (await tenant.submit(**{"Idempotency-Key": "fast"})).headers["idempotent-replayed"] == "true"
    assert (await tenant.get(f"/api/v1/predictions/{submitted.json()['id']}")).status_code == 200
    sim.faults.submit_status, sim.faults.submit_count = 400, 1
    assert (await tenant.submit(valid_body(seed=2))).status_code == 422

    async def completed() -> bool:
        answer = await tenant.get(f"/api/v1/predictions/{submitted.json()['id']}")
        return bool(answer.json()["status"] == "completed")

    await eventually(completed, what="the prediction to complete")
    assert dict(prebuilt.fallbacks) == {}
    after = prebuilt.fast_runs()
    ran = {" ".join(sql.split()) for sql, runs in after.items() if runs > before.get(sql, 0)}
    hot = {
        "the price point": "SELECT price_points.max_seen_cents FROM price_points",
        "the tenant's hold": "UPDATE budget_counters SET reserved_cents=(budget_counters.reserved_cents + $",
        "the prediction's row": "INSERT INTO predictions ",
        "a ledger row": "INSERT INTO ledger_entries ",
        "the confirm": "WITH confirm AS (",
        "the charge": "WITH charge AS (",
        "the counters' shift": "WITH shift AS (",
        "the tenant's day": "INSERT INTO daily_usage ",
        "the GET (reads of a batch, app/predictions/reads.py)": "WITH ORDINALITY AS k(id, tenant_id, scope, period_start",
    }
    missing = {name: start for name, start in hot.items() if not any(start in sql for sql in ran)}
    assert missing == {}, f"not run on the driver: {missing}; ran: {sorted(ran)}"
