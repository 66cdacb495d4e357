"""The ledger writer's one statement keeps a plan that finds rows by their keys (PostgreSQL only).

Its connection caches one generic plan, made at the first batch from the tables' sizes then. On a new
database the predictions table is empty, and a plan made then scanned it whole for every later batch: the
batch's cost grew with the table (app/predictions/onestatement.py, GENERIC_PLAN). Here the plan is made
with the writer connection's settings while predictions is empty (a temporary table of the same shape
shadows it), as on the first batch of a new database."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets import fastbatch
from app.core.database import OwnConnection, create_sessionmaker
from app.predictions.onestatement import GENERIC_PLAN
from tests.conftest import TEST_DB

pytestmark = pytest.mark.skipif(TEST_DB != "postgresql", reason="the one-statement batch is PostgreSQL's")

SHADOWED = ("predictions", "budget_counters", "price_points", "daily_usage", "tenants")


async def _generic_plan(engine: AsyncEngine, settings: dict[str, str]) -> str:
    async with engine.connect() as connection, connection.begin() as outer:
        for table in SHADOWED:
            # A temporary table comes first in the search path: the statement plans against an empty one.
            await connection.exec_driver_sql(f"CREATE TEMPORARY TABLE {table} (LIKE public.{table} INCLUDING ALL)")
        for name, value in settings.items():
            await connection.exec_driver_sql(f"SET LOCAL {name} = {value}")
        sql = str(fastbatch.STATEMENT.compile(dialect=connection.dialect))
        parameters = max(int(n) for n in re.findall(r"\$(\d+)", sql))
        await connection.exec_driver_sql(f"PREPARE writer_batch AS {sql}")
        nulls = ", ".join(["NULL"] * parameters)
        rows = await connection.execute(text(f"EXPLAIN EXECUTE writer_batch({nulls})"))
        plan = "\n".join(row[0] for row in rows)
        await connection.exec_driver_sql("DEALLOCATE writer_batch")
        await outer.rollback()
    return plan


async def test_the_writer_plan_made_on_empty_tables_finds_predictions_by_key(engine: AsyncEngine) -> None:
    plan = await _generic_plan(engine, GENERIC_PLAN)
    assert "Seq Scan on predictions" not in plan, plan
    # The confirms' predictions and the counters they lock, through their primary keys.
    assert re.search(r"(Index|Bitmap Heap) Scan (using \S+ )?on predictions p\b", plan), plan
    assert re.search(r"(Index|Bitmap Heap) Scan (using \S+ )?on budget_counters c\b", plan), plan


async def test_without_those_settings_the_plan_scans_predictions_whole(engine: AsyncEngine) -> None:
    """The case the settings are for: the same generic plan, made the same way, reads every row."""
    plan = await _generic_plan(engine, {"plan_cache_mode": "force_generic_plan"})
    assert "Seq Scan on predictions p" in plan, plan


async def test_the_writer_connection_takes_its_settings_away_with_it(engine: AsyncEngine) -> None:
    """Closed (an outage, a shutdown), the writer's connection is not handed back to the pool: the next
    user of that pool would plan with its settings (no sequential scan, generic plans), whose reset on
    checkin is a ROLLBACK that keeps them."""
    own = OwnConnection(create_sessionmaker(engine), GENERIC_PLAN)
    async with own.use() as connection:
        writer_pid = await connection.scalar(text("SELECT pg_backend_pid()"))
    await own.close()

    idle = engine.pool.checkedin()  # type: ignore[attr-defined]
    connections = [await engine.connect() for _ in range(idle)]
    try:
        for pooled in connections:
            assert await pooled.scalar(text("SELECT pg_backend_pid()")) != writer_pid
            assert await pooled.scalar(text("SHOW enable_seqscan")) == "on"
    finally:
        for pooled in connections:
            await pooled.close()
