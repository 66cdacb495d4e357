"""The ledger writer's batches lock rows in one order (app/budgets/movements.py, top), so a hold batch and a
settle or release batch running at the same time both commit: neither is aborted by PostgreSQL's deadlock
detector. A third connection holds tenant B's row (its slot) to stop the first batch at a known point while
the second one runs; the test waits on the database's lock table, not on time. PostgreSQL only: SQLite has
one writer at a time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core import clock
from app.core.database import transaction
from app.core.ids import new_id
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.schemas import UpstreamSubmitted
from tests.conftest import TEST_DB, valid_body

pytestmark = pytest.mark.skipif(TEST_DB != "postgresql", reason="SQLite has one writer: no lock order to keep")

MODEL = "ltx-2-19b"


async def two_tenants(rt: Runtime, a_rate: int | None) -> tuple[dict[str, Tenant], dict[str, ApiKey]]:
    """Tenants A < B: A with the given rate limit and no maxConcurrent, B with a maxConcurrent (a slot row)."""
    suffix = new_id("t")
    ids = {"a": f"ten_a_{suffix}", "b": f"ten_b_{suffix}"}
    async with transaction(rt.sessions) as session:
        for name, rate, most in (("a", a_rate, None), ("b", None, 100)):
            session.add(
                Tenant(
                    id=ids[name],
                    name=ids[name],
                    budget_cents=100_000,
                    budget_period="month",
                    max_concurrent=most,
                    rate_per_minute=rate,
                    in_flight=0,
                    webhook_secret="whsec_x",
                    created_at=clock.now(),
                )
            )
        await session.flush()
        for name in ("a", "b"):
            session.add(
                ApiKey(
                    id=new_id("key"), tenant_id=ids[name], prefix="vg_x", key_hash=new_id("h"), created_at=clock.now()
                )
            )
    async with transaction(rt.sessions) as session:
        tenants = {name: await session.get_one(Tenant, ids[name]) for name in ("a", "b")}
        keys = {name: await session.scalar(select(ApiKey).where(ApiKey.tenant_id == ids[name])) for name in ids}
    assert all(keys.values())
    return tenants, {name: key for name, key in keys.items() if key is not None}


def hold_jobs(tenants: dict[str, Tenant], keys: dict[str, ApiKey]) -> list[Any]:
    request = GenerateRequest.model_validate(valid_body())
    return [
        predictions_writer.HoldJob(tenants[n], keys[n], MODEL, request, new_id("pred"), None, "") for n in ("a", "b")
    ]


async def hold(rt: Runtime, tenants: dict[str, Tenant], keys: dict[str, ApiKey]) -> list[Any]:
    async with transaction(rt.sessions) as session:
        return await predictions_writer.apply(rt, session, hold_jobs(tenants, keys))


async def waiting(engine: AsyncEngine, count: int, done: asyncio.Task[Any] | None = None) -> None:
    """Until `count` sessions wait for a row lock (or `done` has finished: it did not have to wait)."""
    async with engine.connect() as monitor:
        while True:
            waiters = await monitor.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            if waiters >= count or (done is not None and done.done()):
                return
            await asyncio.sleep(0.01)


async def race(engine: AsyncEngine, tenant_b: str, first: Awaitable[Any], second: Awaitable[Any]) -> list[Any]:
    """Run `first` until it waits for tenant B's row (held by a third connection), then `second` until it
    waits too or finishes; then let go of B's row. Both results, or their exceptions."""
    blocker: AsyncConnection
    async with engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("SELECT 1 FROM tenants WHERE id = :id FOR NO KEY UPDATE"), {"id": tenant_b})
        one = asyncio.ensure_future(first)
        await asyncio.wait_for(waiting(engine, 1, one), 30)
        two = asyncio.ensure_future(second)
        await asyncio.wait_for(waiting(engine, 2, two), 30)
        await blocker.rollback()
    return list(await asyncio.gather(one, two, return_exceptions=True))


@pytest.fixture(autouse=True)
def _start_of_a_minute() -> None:
    # The rate window is a minute: the set-up and the race fall in the same one.
    clock.shift_to(datetime(2031, 3, 4, 12, 0, tzinfo=UTC))


async def test_a_hold_batch_and_a_settle_batch_both_commit(live_runtime: Runtime, engine: AsyncEngine) -> None:
    """A is refused by its rate limit in the hold batch (its day counts the refusal), B admitted (its slot
    and counter); the settle batch charges A and B (their counters, then their days)."""
    rt = live_runtime
    tenants, keys = await two_tenants(rt, a_rate=1)
    held = await hold(rt, tenants, keys)  # uses up A's rate: A is refused in the next batch
    assert not any(isinstance(h, BaseException) for h in held), held
    confirms = [
        predictions_writer.ConfirmJob(
            tenants["a" if p.tenant_id == tenants["a"].id else "b"],
            keys["a" if p.tenant_id == tenants["a"].id else "b"],
            p,
            estimate,
            UpstreamSubmitted.model_validate(
                {"id": new_id("up"), "status": "processing", "costCents": 7, "estimatedTime": "5s"}
            ),
            None,
            "http://gw",
        )
        for p, estimate in held
    ]

    async def settle() -> list[str]:
        async with transaction(rt.sessions) as session:
            return [b["status"] for b in await predictions_writer.apply(rt, session, confirms)]

    hold_result, settle_result = await race(engine, tenants["b"].id, hold(rt, tenants, keys), settle())
    assert not isinstance(hold_result, BaseException), hold_result
    assert not isinstance(settle_result, BaseException), settle_result
    assert [type(r).__name__ for r in hold_result] == ["TooManyRequests", "tuple"]
    assert settle_result == ["processing", "processing"]


async def test_a_hold_batch_and_a_release_batch_both_commit(live_runtime: Runtime, engine: AsyncEngine) -> None:
    """The release batch gives back B's slot, then A's and B's holds; the hold batch takes A's hold and B's
    slot and hold."""
    rt = live_runtime
    tenants, keys = await two_tenants(rt, a_rate=None)
    held = await hold(rt, tenants, keys)
    assert not any(isinstance(h, BaseException) for h in held), held

    async def release() -> set[str]:
        async with transaction(rt.sessions) as session:
            return await predictions_service.release_many(
                session,
                [(p, "upstream refused", keys["a" if p.tenant_id == tenants["a"].id else "b"]) for p, _ in held],
            )

    release_result, hold_result = await race(engine, tenants["b"].id, release(), hold(rt, tenants, keys))
    assert not isinstance(release_result, BaseException), release_result
    assert not isinstance(hold_result, BaseException), hold_result
    assert release_result == {p.id for p, _ in held}
    assert not any(isinstance(r, BaseException) for r in hold_result), hold_result


async def test_a_confirm_that_gives_up_on_database_errors_logs_the_reconciliation_line(
    live_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only an outage: a confirm whose batch fails CONFIRM_ATTEMPTS times on other database errors (a
    deadlock every time, here a charge out of the column's range) leaves a run the vendor billed and the
    ledger never shows; the operator reconciles it from the same line."""
    caplog.set_level(logging.WARNING)
    rt = live_runtime
    tenants, keys = await two_tenants(rt, a_rate=None)
    (prediction, estimate), _ = await hold(rt, tenants, keys)
    upstream_id = new_id("up")
    submitted = UpstreamSubmitted.model_validate(
        {"id": upstream_id, "status": "processing", "costCents": 2**40, "estimatedTime": "5s"}
    )
    job = predictions_writer.ConfirmJob(tenants["a"], keys["a"], prediction, estimate, submitted, None, "http://gw")
    with pytest.raises(DBAPIError):
        await predictions_writer.confirm_until_recorded(rt, job)
    (abandoned,) = [r for r in caplog.records if r.getMessage().startswith("confirm abandoned")]
    assert getattr(abandoned, "prediction_id", None) == prediction.id
    assert getattr(abandoned, "upstream_id", None) == upstream_id
    assert getattr(abandoned, "cost_cents", None) == 2**40
