"""The ledger writer (app/predictions/service.py on app/budgets/movements.reserve_many): many holds in one
transaction, with exactly the outcomes they would have had one at a time, in arrival order."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.budgets import limits as budget_limits
from app.budgets import service as budgets_service
from app.budgets.models import DailyUsage, LedgerEntry, RateLimit
from app.core import clock
from app.core.database import transaction
from app.core.ids import new_id
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import IdempotencyKey, Prediction
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey
from app.tenants.models import Tenant as TenantRow
from app.upstream.simulator import SimState
from tests.conftest import Api, Tenant, valid_body

MODEL = "ltx-2-19b"


async def hold_batch(rt: Runtime, tenant: Tenant, jobs: list[tuple[int, str | None]]) -> list[Any]:
    """One writer batch for `tenant`: (duration in s, Idempotency-Key) per submit, in arrival order."""
    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
        assert tenant_row is not None and key_row is not None
        batch = []
        for duration, idempotency_key in jobs:
            request = GenerateRequest.model_validate(valid_body(duration=duration))
            fingerprint = predictions_service.request_fingerprint(MODEL, request) if idempotency_key else ""
            batch.append(
                predictions_writer.HoldJob(
                    tenant_row, key_row, MODEL, request, new_id("pred"), idempotency_key, fingerprint
                )
            )
        return await predictions_writer.apply(rt, session, batch)


async def count(rt: Runtime, statement: Any) -> int:
    async with transaction(rt.sessions) as session:
        return int(await session.scalar(statement) or 0)


def admitted(results: list[Any]) -> list[bool]:
    return [not isinstance(r, BaseException) for r in results]


async def test_a_batch_over_the_budget_admits_exactly_what_fits_in_arrival_order(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=20)
    # 9, 18 and 9 cents: together 36. Alone, in order: 9 fits, 18 would make 27, the last 9 makes 18.
    results = await hold_batch(api.runtime, tenant, [(5, None), (10, None), (5, None)])

    assert admitted(results) == [True, False, True]
    assert isinstance(results[1], budgets_service.BudgetExceeded)
    assert results[1].fields["reservedCents"] == 9  # what the first one held when the second came
    async with transaction(api.runtime.sessions) as session:
        assert (
            await budgets_service.current_usage(session, await session.get(TenantRow, tenant.id))
        ).reserved_cents == 18  # type: ignore[arg-type]
        assert await budgets_service.verify_ledger(session) == []
    assert await count(api.runtime, select(func.count()).where(Prediction.tenant_id == tenant.id)) == 2
    assert await count(api.runtime, select(func.count()).where(LedgerEntry.tenant_id == tenant.id)) == 2
    assert await count(api.runtime, select(DailyUsage.refusals).where(DailyUsage.tenant_id == tenant.id)) == 1


async def rate_units(runtime: Runtime, tenant: Tenant) -> int:
    """The rate units the tenant has used: how far its GCRA state runs ahead of now, in intervals."""
    tat = await count(runtime, select(RateLimit.tat_us).where(RateLimit.scope == f"tenant:{tenant.id}"))
    limit = tenant.data["ratePerMinute"]
    now_us = (clock.now() - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    return round((tat - now_us) / (60_000_000 // limit))


async def test_a_batch_that_fits_takes_its_rate_and_slots_at_once(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=100, maxConcurrent=5, ratePerMinute=5)
    results = await hold_batch(api.runtime, tenant, [(5, None)] * 3)

    assert admitted(results) == [True, True, True]
    assert await count(api.runtime, select(TenantRow.in_flight).where(TenantRow.id == tenant.id)) == 3
    assert await rate_units(api.runtime, tenant) == 3


async def test_refused_members_of_a_batch_take_no_rate_and_no_slot(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=18, maxConcurrent=3, ratePerMinute=3)
    # The last two are over the budget: they must give back the rate unit and the slot they passed.
    results = await hold_batch(api.runtime, tenant, [(5, None)] * 4)

    assert admitted(results) == [True, True, False, False]
    assert all(isinstance(r, budgets_service.BudgetExceeded) for r in results[2:])
    assert await count(api.runtime, select(TenantRow.in_flight).where(TenantRow.id == tenant.id)) == 2
    assert await rate_units(api.runtime, tenant) == 2
    assert await count(api.runtime, select(DailyUsage.refusals).where(DailyUsage.tenant_id == tenant.id)) == 2


async def test_the_rate_limit_holds_inside_a_batch(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(ratePerMinute=2)
    results = await hold_batch(api.runtime, tenant, [(5, None)] * 3)

    assert admitted(results) == [True, True, False]
    assert isinstance(results[2], budget_limits.TooManyRequests)
    assert not isinstance(results[2], budget_limits.ConcurrencyLimited)
    assert await rate_units(api.runtime, tenant) == 2


async def test_the_concurrency_limit_holds_inside_a_batch(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(maxConcurrent=2)
    results = await hold_batch(api.runtime, tenant, [(5, None)] * 3)

    assert admitted(results) == [True, True, False]
    assert isinstance(results[2], budget_limits.ConcurrencyLimited)
    assert await count(api.runtime, select(TenantRow.in_flight).where(TenantRow.id == tenant.id)) == 2


async def test_idempotency_keys_in_one_batch(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=9)
    results = await hold_batch(api.runtime, tenant, [(5, "same"), (5, "same"), (5, "refused")])

    assert admitted(results) == [True, False, False]
    assert isinstance(results[1], predictions_service.IdempotencyKeyInFlight)
    assert isinstance(results[2], budgets_service.BudgetExceeded)
    # Only the held one keeps its key: a refusal is forgotten, so the caller may retry with it.
    keys = select(IdempotencyKey.key).where(IdempotencyKey.tenant_id == tenant.id)
    async with transaction(api.runtime.sessions) as session:
        assert list(await session.scalars(keys)) == ["same"]


async def test_concurrent_submits_share_writer_batches(live_api: Api, sim: SimState) -> None:
    tenant = await live_api.tenant(budgetCents=10_000)

    def seen(suffix: str) -> float:
        return REGISTRY.get_sample_value(f"vidgate_ledger_batch_size_{suffix}", {"op": "hold"}) or 0.0

    items, batches = seen("sum"), seen("count")
    responses = await asyncio.gather(*(tenant.submit() for _ in range(40)))

    assert [r.status_code for r in responses] == [200] * 40
    assert seen("sum") - items == 40  # every hold went through the writer...
    assert seen("count") - batches < 40  # ...and some of them shared a transaction
    async with transaction(live_api.runtime.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []
