"""Statements run on the driver (app/core/prebuilt.py) behave as SQLAlchemy's execution of them: inside the
caller's transaction (even as its first statement), with the same rows, seen by the engine's cursor events,
and failing with SQLAlchemy's errors. On SQLite they are SQLAlchemy's execution."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets.models import PricePoint
from app.core import prebuilt
from app.core.database import create_sessionmaker, table_of, transaction

_points = table_of(PricePoint)
_INSERT = insert(_points)
_READ = select(_points).where(_points.c.model_id == bindparam("b_model")).order_by(_points.c.duration_s)


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
