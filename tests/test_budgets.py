"""Budgets, limits and the ledger (SPEC section 3), through the API and the service functions.

Every test asserts exact amounts: 480p for 5 s is 9 cents in the simulator unless a test changes its
price multiplier, so the expected counters, ledger rows and refusals are known to the cent.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter, LedgerEntry
from app.core import clock
from app.core.database import create_engine, create_sessionmaker, transaction
from app.core.ids import new_id
from app.main import create_app
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import IdempotencyKey, Prediction
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime, build_runtime
from app.tenants.models import ApiKey
from app.tenants.models import Tenant as TenantRow
from app.upstream.simulator import SimState
from app.worker import Worker
from tests.conftest import Api, Tenant, eventually, make_settings, valid_body

MODEL = "ltx-2-19b"
PRICE = 9  # 480p, 5 s


# ---------------------------------------------------------------- helpers


def iso_z(moment: datetime) -> str:
    """The vendor's form, written here without the gateway's helper."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def new_key(api: Api, tenant: Tenant, **body: Any) -> tuple[str, str]:
    """Another API key for the tenant; returns (key id, raw key)."""
    created = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json=body)
    assert created.status_code == 201, created.text
    data = created.json()
    if "budgetCents" in body:
        assert data["budgetCents"] == body["budgetCents"]
    return data["id"], data["key"]


async def submit_as(
    http: httpx.AsyncClient, raw_key: str, body: dict[str, Any] | None = None, **headers: str
) -> httpx.Response:
    return await http.post(
        f"/api/v1/models/{MODEL}/generate",
        json=body if body is not None else valid_body(),
        headers={"Authorization": f"Bearer {raw_key}", **headers},
    )


async def usage(tenant: Tenant) -> dict[str, Any]:
    response = await tenant.get("/api/v1/usage")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def ledger_of(rt: Runtime, prediction_id: str) -> list[tuple[str, int, int]]:
    async with transaction(rt.sessions) as session:
        rows = await session.scalars(
            select(LedgerEntry).where(LedgerEntry.prediction_id == prediction_id).order_by(LedgerEntry.id)
        )
        return [(r.kind, r.reserved_delta, r.spent_delta) for r in rows]


async def ledger_rows(rt: Runtime) -> list[LedgerEntry]:
    async with transaction(rt.sessions) as session:
        return list(await session.scalars(select(LedgerEntry).order_by(LedgerEntry.id)))


async def mismatches(rt: Runtime) -> list[budgets_service.Mismatch]:
    async with transaction(rt.sessions) as session:
        return await budgets_service.verify_ledger(session)


async def in_flight(rt: Runtime, tenant_id: str) -> int:
    async with transaction(rt.sessions) as session:
        value = await session.scalar(select(TenantRow.in_flight).where(TenantRow.id == tenant_id))
        assert value is not None
        return int(value)


async def counter(rt: Runtime, scope: str) -> list[tuple[int, int]]:
    async with transaction(rt.sessions) as session:
        rows = await session.scalars(
            select(BudgetCounter).where(BudgetCounter.scope == scope).order_by(BudgetCounter.period_start)
        )
        return [(c.spent_cents, c.reserved_cents) for c in rows]


async def predictions_of(rt: Runtime, tenant_id: str) -> list[Prediction]:
    async with transaction(rt.sessions) as session:
        rows = await session.scalars(
            select(Prediction).where(Prediction.tenant_id == tenant_id).order_by(Prediction.created_at)
        )
        return list(rows)


def assert_budget_problem(
    response: httpx.Response,
    *,
    scope: str,
    limit: int,
    spent: int,
    reserved: int,
    estimate: int,
    resets_at: str | None,
) -> None:
    assert response.status_code == 402, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "budget_exceeded"
    assert problem["status"] == 402
    assert problem["scope"] == scope
    assert problem["limitCents"] == limit
    assert problem["spentCents"] == spent
    assert problem["reservedCents"] == reserved
    assert problem["estimateCents"] == estimate
    assert problem["remainingCents"] == max(limit - spent - reserved, 0)
    assert problem["resetsAt"] == resets_at
    assert problem["detail"]


@contextlib.asynccontextmanager
async def running_worker(rt: Runtime) -> AsyncIterator[Worker]:
    process = Worker(rt)
    task = asyncio.create_task(process.run())
    try:
        yield process
    finally:
        process.stop()
        await asyncio.wait_for(task, 30)


async def status_is(tenant: Tenant, prediction_id: str, status: str) -> bool:
    response = await tenant.get(f"/api/v1/predictions/{prediction_id}")
    return response.status_code == 200 and response.json()["status"] == status


@pytest.fixture
async def replicas(live_runtime: Runtime, database_url: str, sim_url: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Three gateway "replicas" in this process: the live runtime and two more, each with its own engine
    (its own connection pool), app and HTTP client, all on the same database."""
    runtimes = [live_runtime]
    engines = []
    for _ in range(2):
        engine = create_engine(database_url, pool_size=4)
        engines.append(engine)
        runtimes.append(build_runtime(make_settings(database_url, sim_url), engine, create_sessionmaker(engine)))
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for rt in runtimes:
            # A 500 is an answer to count, not an exception that hides the others.
            transport = httpx.ASGITransport(app=create_app(rt.settings, rt), raise_app_exceptions=False)
            client = httpx.AsyncClient(transport=transport, base_url="http://gateway.test", timeout=120)
            clients.append(await stack.enter_async_context(client))
        try:
            yield clients
        finally:
            for rt in runtimes[1:]:
                await rt.close()
            for engine in engines:
                await engine.dispose()


# ---------------------------------------------------------------- the race


N_FIT = 37
CONCURRENT = 200


@pytest.mark.parametrize("binding", ["tenant", "key"])
async def test_concurrent_submits_never_overspend(
    live_api: Api, replicas: list[httpx.AsyncClient], sim: SimState, binding: str
) -> None:
    """200 submits race from three replicas for a budget that fits exactly 37 of them."""
    limit = N_FIT * PRICE  # 333
    if binding == "tenant":
        tenant = await live_api.tenant(budgetCents=limit)
        raw_key = tenant.key
    else:
        tenant = await live_api.tenant(budgetCents=10 * limit)
        _, raw_key = await new_key(live_api, tenant, budgetCents=limit)
    period = budgets_service.period_of("month", clock.now())
    assert period.end is not None

    responses = await asyncio.gather(*(submit_as(replicas[i % len(replicas)], raw_key) for i in range(CONCURRENT)))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: N_FIT, 402: CONCURRENT - N_FIT}, [r.text for r in responses if r.status_code >= 500][:3]
    accepted = [r.json() for r in responses if r.status_code == 200]
    assert len({body["id"] for body in accepted}) == N_FIT
    assert all(body["costCents"] == PRICE for body in accepted)
    for response in responses:
        if response.status_code == 402:
            # A refusal means the other 37 were held or charged at that moment: 333 of 333 used.
            problem = response.json()
            assert problem["spentCents"] + problem["reservedCents"] == limit, problem
            assert_budget_problem(
                response,
                scope=binding,
                limit=limit,
                spent=problem["spentCents"],
                reserved=problem["reservedCents"],
                estimate=PRICE,
                resets_at=iso_z(period.end),
            )
    assert sim.submits == N_FIT

    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (limit, 0)
    assert now["spentCents"] + now["reservedCents"] <= (now["budgetCents"] or 0)
    assert await mismatches(live_api.runtime) == []
    kinds = Counter(entry.kind for entry in await ledger_rows(live_api.runtime))
    assert kinds == {"reserve": N_FIT, "settle": N_FIT}


# ---------------------------------------------------------------- per-key budgets


async def test_key_budget_smaller_than_tenant_budget(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=1000)
    key_id, small_key = await new_key(api, tenant, name="intern", budgetCents=20)

    assert (await submit_as(api.http, small_key)).status_code == 200
    assert (await submit_as(api.http, small_key)).status_code == 200
    refused = await submit_as(api.http, small_key)
    period = budgets_service.period_of("month", clock.now())
    assert period.end is not None
    assert_budget_problem(
        refused, scope="key", limit=20, spent=18, reserved=0, estimate=PRICE, resets_at=iso_z(period.end)
    )
    assert sim.submits == 2

    # The tenant's other key still has the tenant's budget.
    assert (await tenant.submit()).status_code == 200
    assert (await usage(tenant))["spentCents"] == 27
    assert await counter(api.runtime, f"key:{key_id}") == [(18, 0)]
    assert await counter(api.runtime, f"tenant:{tenant.id}") == [(27, 0)]
    # The refused hold on the key rolled back the tenant's hold taken before it in the same transaction.
    assert await mismatches(api.runtime) == []


async def test_key_budget_zero_refuses_everything(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    _, zero_key = await new_key(api, tenant, budgetCents=0)
    refused = await submit_as(api.http, zero_key)
    assert refused.status_code == 402
    assert refused.json()["scope"] == "key"
    assert refused.json()["limitCents"] == 0
    assert sim.submits == 0


# ---------------------------------------------------------------- concurrency and rate


async def test_max_concurrent_then_freed_by_finishing(live_api: Api, sim: SimState) -> None:
    tenant = await live_api.tenant(maxConcurrent=2)
    first = await tenant.submit()
    second = await tenant.submit()
    assert (first.status_code, second.status_code) == (200, 200)

    third = await tenant.submit()
    assert third.status_code == 429, third.text
    assert third.headers["content-type"] == "application/problem+json"
    assert int(third.headers["retry-after"]) >= 1
    problem = third.json()
    assert problem["code"] == "concurrency_limited"
    assert problem["limit"] == 2
    assert problem["retryAfter"] == int(third.headers["retry-after"])
    assert sim.submits == 2
    assert (await usage(tenant))["spentCents"] == 18
    assert await in_flight(live_api.runtime, tenant.id) == 2

    async with running_worker(live_api.runtime):
        for body in (first.json(), second.json()):
            await eventually(lambda pid=body["id"]: status_is(tenant, pid, "completed"), what="completion")
        assert await in_flight(live_api.runtime, tenant.id) == 0
        fourth = await tenant.submit()
        assert fourth.status_code == 200, fourth.text
    assert sim.submits == 3
    assert await mismatches(live_api.runtime) == []


async def test_max_concurrent_set_later_counts_predictions_already_in_flight(live_api: Api, sim: SimState) -> None:
    tenant = await live_api.tenant()
    first = await tenant.submit()
    second = await tenant.submit()
    assert (first.status_code, second.status_code) == (200, 200)

    patched = await live_api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"maxConcurrent": 2})
    assert patched.status_code == 200, patched.text
    assert patched.json()["maxConcurrent"] == 2
    assert await in_flight(live_api.runtime, tenant.id) == 2
    refused = await tenant.submit()
    assert refused.status_code == 429
    assert refused.json()["code"] == "concurrency_limited"

    async with running_worker(live_api.runtime):
        for body in (first.json(), second.json()):
            await eventually(lambda pid=body["id"]: status_is(tenant, pid, "completed"), what="completion")
        assert await in_flight(live_api.runtime, tenant.id) == 0
        assert (await tenant.submit()).status_code == 200
        assert await in_flight(live_api.runtime, tenant.id) == 1
    assert sim.submits == 3


async def test_budget_refusal_does_not_take_a_concurrency_slot(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(maxConcurrent=1, budgetCents=5)
    refused = await tenant.submit()
    assert refused.status_code == 402
    assert await in_flight(api.runtime, tenant.id) == 0
    patched = await api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"budgetCents": 100})
    assert patched.status_code == 200
    accepted = await tenant.submit()
    assert accepted.status_code == 200, accepted.text
    assert await in_flight(api.runtime, tenant.id) == 1


async def test_rate_per_minute_is_a_burst_then_a_steady_pace(api: Api, sim: SimState) -> None:
    clock.shift_to(datetime(2030, 6, 10, 10, 0, 10, tzinfo=UTC))
    tenant = await api.tenant(ratePerMinute=3)
    for _ in range(3):
        assert (await tenant.submit()).status_code == 200

    refused = await tenant.submit()
    assert refused.status_code == 429, refused.text
    problem = refused.json()
    assert problem["code"] == "rate_limited"
    assert problem["limit"] == 3
    retry_after = int(refused.headers["retry-after"])
    assert retry_after == 20  # one unit every 60/3 s
    assert problem["retryAfter"] == retry_after
    assert sim.submits == 3
    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (27, 0)

    # One interval later one more fits, and only one.
    clock.shift_to(datetime(2030, 6, 10, 10, 0, 30, 500000, tzinfo=UTC))
    assert (await tenant.submit()).status_code == 200
    assert (await tenant.submit()).status_code == 429
    # A quiet minute gives the whole burst back.
    clock.shift_to(datetime(2030, 6, 10, 10, 2, 0, tzinfo=UTC))
    for _ in range(3):
        assert (await tenant.submit()).status_code == 200
    again = await tenant.submit()
    assert again.status_code == 429
    assert again.json()["code"] == "rate_limited"
    assert sim.submits == 7


async def test_a_minute_boundary_does_not_double_the_rate(api: Api, sim: SimState) -> None:
    """Issue 24 B7: with calendar minutes, ratePerMinute=2 let 4 submits through within 25 s across a
    boundary. Any 25 s now admit at most 2 (and any 60 s at most 3: a burst, then one every 30 s)."""
    clock.shift_to(datetime(2030, 6, 10, 10, 0, 50, tzinfo=UTC))
    tenant = await api.tenant(ratePerMinute=2)
    answers = []
    for moment in (50, 55, 61, 65, 75):  # seconds after 10:00:00
        clock.shift_to(datetime(2030, 6, 10, 10, 0, 0, tzinfo=UTC) + timedelta(seconds=moment))
        answers.append((await tenant.submit()).status_code)
    assert answers == [200, 200, 429, 429, 429]
    clock.shift_to(datetime(2030, 6, 10, 10, 1, 21, tzinfo=UTC))  # one interval (30 s) after the first, and a bit
    assert (await tenant.submit()).status_code == 200
    assert sim.submits == 3


# ---------------------------------------------------------------- periods


@pytest.mark.parametrize(
    ("period", "old_start", "new_start", "new_end"),
    [
        ("day", datetime(2030, 3, 31, tzinfo=UTC), datetime(2030, 4, 1, tzinfo=UTC), datetime(2030, 4, 2, tzinfo=UTC)),
        ("week", datetime(2030, 3, 25, tzinfo=UTC), datetime(2030, 4, 1, tzinfo=UTC), datetime(2030, 4, 8, tzinfo=UTC)),
        (
            "month",
            datetime(2030, 3, 1, tzinfo=UTC),
            datetime(2030, 4, 1, tzinfo=UTC),
            datetime(2030, 5, 1, tzinfo=UTC),
        ),
    ],
)
async def test_period_rolls_over(
    api: Api, sim: SimState, period: str, old_start: datetime, new_start: datetime, new_end: datetime
) -> None:
    # Sunday 31 March 2030, ten seconds before a new day, ISO week and month begin together.
    clock.shift_to(datetime(2030, 3, 31, 23, 59, 50, tzinfo=UTC))
    tenant = await api.tenant(budgetCents=18, budgetPeriod=period)
    assert (await tenant.submit()).status_code == 200
    assert (await tenant.submit()).status_code == 200
    refused = await tenant.submit()
    assert_budget_problem(
        refused, scope="tenant", limit=18, spent=18, reserved=0, estimate=PRICE, resets_at=iso_z(new_start)
    )
    before = await usage(tenant)
    assert parse_time(before["periodStart"]) == old_start
    assert parse_time(before["periodEnd"]) == new_start
    assert before["remainingCents"] == 0

    clock.shift_to(datetime(2030, 4, 1, 0, 0, 5, tzinfo=UTC))
    accepted = await tenant.submit()
    assert accepted.status_code == 200, accepted.text
    after = await usage(tenant)
    assert after["period"] == period
    assert parse_time(after["periodStart"]) == new_start
    assert parse_time(after["periodEnd"]) == new_end
    assert (after["spentCents"], after["reservedCents"], after["remainingCents"]) == (9, 0, 9)
    assert sim.submits == 3
    assert await counter(api.runtime, f"tenant:{tenant.id}") == [(18, 0), (9, 0)]
    assert await mismatches(api.runtime) == []


async def test_total_period_never_resets(api: Api, sim: SimState) -> None:
    clock.shift_to(datetime(2030, 3, 31, 23, 59, 50, tzinfo=UTC))
    tenant = await api.tenant(budgetCents=9, budgetPeriod="total")
    assert (await tenant.submit()).status_code == 200
    refused = await tenant.submit()
    assert_budget_problem(refused, scope="tenant", limit=9, spent=9, reserved=0, estimate=PRICE, resets_at=None)
    clock.shift_to(datetime(2031, 1, 1, 0, 0, 5, tzinfo=UTC))
    again = await tenant.submit()
    assert again.status_code == 402
    now = await usage(tenant)
    assert now["period"] == "total"
    assert now["periodStart"] is None and now["periodEnd"] is None
    assert now["spentCents"] == 9


@pytest.mark.parametrize(
    ("kind", "at", "start", "end"),
    [
        ("day", datetime(2030, 3, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2030, 3, 31), datetime(2030, 4, 1)),
        ("day", datetime(2030, 4, 1, tzinfo=UTC), datetime(2030, 4, 1), datetime(2030, 4, 2)),
        ("day", datetime(2029, 12, 31, 12, tzinfo=UTC), datetime(2029, 12, 31), datetime(2030, 1, 1)),
        # Weeks start on Monday, UTC.
        ("week", datetime(2030, 3, 31, 23, 59, tzinfo=UTC), datetime(2030, 3, 25), datetime(2030, 4, 1)),
        ("week", datetime(2030, 4, 1, tzinfo=UTC), datetime(2030, 4, 1), datetime(2030, 4, 8)),
        ("week", datetime(2030, 1, 1, 9, tzinfo=UTC), datetime(2029, 12, 31), datetime(2030, 1, 7)),
        ("month", datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2029, 12, 1), datetime(2030, 1, 1)),
        ("month", datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 1), datetime(2030, 2, 1)),
        ("month", datetime(2028, 2, 29, 12, tzinfo=UTC), datetime(2028, 2, 1), datetime(2028, 3, 1)),
    ],
)
def test_period_of(kind: str, at: datetime, start: datetime, end: datetime) -> None:
    period = budgets_service.period_of(kind, at)
    assert period.start == start.replace(tzinfo=UTC)
    assert period.end == end.replace(tzinfo=UTC)


def test_period_of_other_timezone_and_total() -> None:
    # Another offset is converted to UTC first: 01:00 at +02:00 on 1 April is still March in UTC.
    plus_two = timezone(timedelta(hours=2))
    period = budgets_service.period_of("month", datetime(2030, 4, 1, 1, 0, tzinfo=plus_two))
    assert (period.start, period.end) == (datetime(2030, 3, 1, tzinfo=UTC), datetime(2030, 4, 1, tzinfo=UTC))
    day = budgets_service.period_of("day", datetime(2030, 1, 1, 1, 0, tzinfo=plus_two))
    assert day.start == datetime(2029, 12, 31, tzinfo=UTC)
    total = budgets_service.period_of("total", datetime(2030, 4, 1, tzinfo=UTC))
    assert total == budgets_service.Period(datetime(1970, 1, 1, tzinfo=UTC), None)


# ---------------------------------------------------------------- failed predictions


@pytest.mark.parametrize("settings_overrides", [{}, {"keep_failed_charge": False}])
async def test_failed_prediction_ledger_entries(
    live_api: Api, worker: Any, sim: SimState, settings_overrides: dict[str, Any]
) -> None:
    sim.config.failure_ratio = 1.0
    tenant = await live_api.tenant(budgetCents=100, maxConcurrent=5)
    pred = (await tenant.submit()).json()
    await eventually(lambda: status_is(tenant, pred["id"], "failed"), what="failed status")

    expected = [("reserve", PRICE, 0), ("settle", -PRICE, PRICE)]
    if settings_overrides.get("keep_failed_charge") is False:
        expected.append(("refund", 0, -PRICE))
    assert await ledger_of(live_api.runtime, pred["id"]) == expected
    spent = sum(entry[2] for entry in expected)
    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"], now["remainingCents"]) == (spent, 0, 100 - spent)
    assert await in_flight(live_api.runtime, tenant.id) == 0
    assert await mismatches(live_api.runtime) == []


# ---------------------------------------------------------------- upstream refusal or outage


@pytest.mark.parametrize(
    ("upstream_status", "status", "code"),
    [(400, 422, "upstream_rejected"), (500, 503, "upstream_unavailable"), (0, 503, "upstream_unavailable")],
)
async def test_upstream_failure_releases_hold_and_slot(
    api: Api, sim: SimState, upstream_status: int, status: int, code: str
) -> None:
    tenant = await api.tenant(budgetCents=100, maxConcurrent=1)
    sim.faults.submit_status = upstream_status
    sim.faults.submit_count = 1

    response = await tenant.submit(valid_body(queue=False))  # not queued (SPEC §12): refused as before
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1
    else:
        assert problem["upstreamStatus"] == 400
    assert sim.submits == 1

    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"], now["remainingCents"]) == (0, 0, 100)
    (rejected,) = await predictions_of(api.runtime, tenant.id)
    assert rejected.status == "rejected"
    assert await ledger_of(api.runtime, rejected.id) == [("reserve", PRICE, 0), ("release", -PRICE, 0)]
    assert await in_flight(api.runtime, tenant.id) == 0
    assert await mismatches(api.runtime) == []

    # The one concurrency slot is free again.
    retry = await tenant.submit()
    assert retry.status_code == 200, retry.text
    assert sim.submits == 2
    assert (await usage(tenant))["spentCents"] == PRICE


# ---------------------------------------------------------------- real cost above the estimate


async def test_charge_above_estimate_is_recorded_and_learned(api: Api, sim: SimState) -> None:
    sim.config.price_multiplier = 2
    tenant = await api.tenant(budgetCents=35)

    first = await tenant.submit()
    assert first.status_code == 200, first.text
    assert first.json()["costCents"] == 18
    assert await ledger_of(api.runtime, first.json()["id"]) == [("reserve", PRICE, 0), ("settle", -PRICE, 18)]
    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (18, 0)
    got = await tenant.get(f"/api/v1/predictions/{first.json()['id']}")
    assert got.json()["costCents"] == 18

    async with transaction(api.runtime.sessions) as session:
        table: dict[str, dict[str, float]] = {}
        assert await budgets_service.estimate_cents(session, table, MODEL, "480p", 5) == 18
        # Learned per model, resolution and duration: other price points keep the table's estimate.
        assert await budgets_service.estimate_cents(session, table, MODEL, "480p", 6) == 11
        assert await budgets_service.estimate_cents(session, table, MODEL, "720p", 5) == 21

    # 17 cents left, but the next one is now estimated at 18.
    refused = await tenant.submit()
    period = budgets_service.period_of("month", clock.now())
    assert period.end is not None
    assert_budget_problem(
        refused, scope="tenant", limit=35, spent=18, reserved=0, estimate=18, resets_at=iso_z(period.end)
    )
    assert sim.submits == 1

    # A cheaper bill later never lowers the remembered maximum.
    sim.config.price_multiplier = 1
    patched = await api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"budgetCents": 100})
    assert patched.status_code == 200
    cheap = await tenant.submit()
    assert cheap.status_code == 200
    assert cheap.json()["costCents"] == PRICE
    assert await ledger_of(api.runtime, cheap.json()["id"]) == [("reserve", 18, 0), ("settle", -18, PRICE)]
    async with transaction(api.runtime.sessions) as session:
        assert await budgets_service.estimate_cents(session, {}, MODEL, "480p", 5) == 18
    assert (await usage(tenant))["spentCents"] == 27
    assert await mismatches(api.runtime) == []


# ---------------------------------------------------------------- crash recovery


async def _hold_without_forwarding(
    rt: Runtime, tenant: Tenant, idempotency_key: str | None
) -> tuple[Prediction, budgets_service.Estimate]:
    """Transaction 1 of a submit, committed, as a process that dies right after it leaves it."""
    request = GenerateRequest.model_validate(valid_body())
    prediction_id = new_id("pred")
    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
        assert tenant_row is not None and key_row is not None
        if idempotency_key is not None:
            fingerprint = predictions_service.request_fingerprint(MODEL, request)
            claimed = await predictions_writer._claim_idempotency_key(
                session, rt, tenant_row, idempotency_key, fingerprint, prediction_id
            )
            assert claimed is None
        job = predictions_writer.HoldJob(tenant_row, key_row, MODEL, request, prediction_id, None, "")
        (result,) = await predictions_writer.apply(rt, session, [job])
        assert isinstance(result, tuple), result
        held, estimate = result
        assert estimate.cents == PRICE
        return held, estimate


async def test_crash_between_reserve_and_forward_is_recovered(live_api: Api, sim: SimState) -> None:
    """A process that committed transaction 1 (hold, slot, Idempotency-Key) and died before calling
    the upstream leaves a 'submitting' prediction. A process that dies after the upstream call but
    before transaction 2 leaves exactly the same rows (status 'submitting', the estimate held, no
    upstream id): the database cannot tell the two apart, so recovery treats them alike (see
    test_crash_between_forward_and_settle_looks_the_same). After submit_recovery_s the hold is
    released, the slot freed and the Idempotency-Key forgotten."""
    rt = live_api.runtime
    start = datetime(2030, 6, 10, 12, 0, tzinfo=UTC)
    clock.shift_to(start)
    tenant = await live_api.tenant(budgetCents=100, maxConcurrent=1)
    held, _ = await _hold_without_forwarding(rt, tenant, "crash-key")
    assert held.status == "submitting"

    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (0, PRICE)
    assert await in_flight(rt, tenant.id) == 1
    in_flight_answer = await tenant.submit(**{"Idempotency-Key": "crash-key"})
    assert in_flight_answer.status_code == 409
    assert in_flight_answer.json()["code"] == "idempotency_key_in_flight"
    blocked = await tenant.submit()
    assert blocked.status_code == 429
    assert blocked.json()["code"] == "concurrency_limited"

    # Too young: its upstream call might still be running.
    clock.shift_to(start + timedelta(seconds=rt.settings.submit_recovery_s - 5))
    assert await predictions_service.recover_interrupted_submits(rt) == 0
    assert (await usage(tenant))["reservedCents"] == PRICE

    clock.shift_to(start + timedelta(seconds=rt.settings.submit_recovery_s + 1))
    assert await predictions_service.recover_interrupted_submits(rt) == 1
    assert await predictions_service.recover_interrupted_submits(rt) == 0

    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"], now["remainingCents"]) == (0, 0, 100)
    assert await in_flight(rt, tenant.id) == 0
    assert await ledger_of(rt, held.id) == [("reserve", PRICE, 0), ("release", -PRICE, 0)]
    assert await mismatches(rt) == []
    (row,) = await predictions_of(rt, tenant.id)
    assert row.status == "rejected"
    assert row.error and "interrupted" in row.error
    async with transaction(rt.sessions) as session:
        assert await session.get(IdempotencyKey, (tenant.id, "crash-key")) is None
    assert sim.submits == 0

    retried = await tenant.submit(**{"Idempotency-Key": "crash-key"})
    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert retried.json()["id"] != held.id
    assert sim.submits == 1
    assert (await usage(tenant))["spentCents"] == PRICE


async def test_crash_between_forward_and_settle_looks_the_same(live_api: Api, sim: SimState) -> None:
    """The upstream accepted (and billed) the prediction, then the process died before transaction 2.
    The rows are indistinguishable from a crash before forwarding, and recovery releases the hold.
    If the lost confirmation were applied after all (impossible while submit_recovery_s exceeds the
    upstream timeout, which settings enforce), the bill is still recorded and the ledger still adds up."""
    rt = live_api.runtime
    start = datetime(2030, 6, 10, 12, 0, tzinfo=UTC)
    clock.shift_to(start)
    tenant = await live_api.tenant(budgetCents=100, maxConcurrent=5)
    held, estimate = await _hold_without_forwarding(rt, tenant, None)
    submitted = await rt.upstream.submit(MODEL, GenerateRequest.model_validate(valid_body()).upstream_body())
    assert sim.submits == 1

    async with transaction(rt.sessions) as session:
        row = await session.get(Prediction, held.id)
        assert row is not None
        assert (row.status, row.upstream_id, row.charged_cents) == ("submitting", None, None)

    clock.shift_to(start + timedelta(seconds=rt.settings.submit_recovery_s + 1))
    assert await predictions_service.recover_interrupted_submits(rt) == 1
    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (0, 0)
    assert await in_flight(rt, tenant.id) == 0

    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        key_row = await session.get(ApiKey, held.api_key_id)
        assert tenant_row is not None and key_row is not None
        job = predictions_writer.ConfirmJob(tenant_row, key_row, held, estimate, submitted, None, "")
        (late,) = await predictions_writer.apply(rt, session, [job])
        assert late["status"] == "processing"
        assert late["costCents"] == PRICE
    assert await ledger_of(rt, held.id) == [("reserve", PRICE, 0), ("release", -PRICE, 0), ("settle", 0, PRICE)]
    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (PRICE, 0)
    assert await in_flight(rt, tenant.id) == 1
    assert await mismatches(rt) == []


# ---------------------------------------------------------------- operator usage report


def _expected_report(rows: list[LedgerEntry], group_by: str, start: datetime | None, end: datetime | None) -> dict:
    """The report recomputed from the ledger rows in Python."""
    out: dict[str, dict[str, int]] = {}
    for entry in rows:
        if entry.spent_delta == 0:
            continue
        if start is not None and entry.created_at < start:
            continue
        if end is not None and entry.created_at >= end:
            continue
        key = {
            "tenant": entry.tenant_id,
            "model": entry.model_id,
            "day": entry.created_at.date().isoformat(),
        }[group_by]
        bucket = out.setdefault(str(key), {"spentCents": 0, "predictions": 0})
        bucket["spentCents"] += entry.spent_delta
        bucket["predictions"] += entry.kind == "settle"
    return out


def _as_dict(data: list[dict[str, Any]], group_by: str) -> dict[str, dict[str, int]]:
    return {
        str(row[group_by]): {"spentCents": int(row["spentCents"]), "predictions": int(row["predictions"])}
        for row in data
    }


async def test_admin_usage_report_matches_ledger(api: Api, sim: SimState) -> None:
    clock.shift_to(datetime(2030, 1, 10, 12, 0, tzinfo=UTC))
    a = await api.tenant(name="a")
    b = await api.tenant(name="b")
    assert (await a.submit()).status_code == 200
    assert (await a.submit()).status_code == 200
    sim.faults.submit_status, sim.faults.submit_count = 500, 1
    assert (await b.submit(valid_body(queue=False))).status_code == 503  # reserve + release: nothing spent

    clock.shift_to(datetime(2030, 1, 11, 12, 0, tzinfo=UTC))
    assert (await a.submit(valid_body(resolution="720p"))).json()["costCents"] == 21
    assert (await b.submit(valid_body(duration=10))).json()["costCents"] == 18

    rows = await ledger_rows(api.runtime)
    expected = {
        "tenant": {a.id: {"spentCents": 39, "predictions": 3}, b.id: {"spentCents": 18, "predictions": 1}},
        "model": {MODEL: {"spentCents": 57, "predictions": 4}},
        "day": {
            "2030-01-10": {"spentCents": 18, "predictions": 2},
            "2030-01-11": {"spentCents": 39, "predictions": 2},
        },
    }
    for group_by, want in expected.items():
        assert _expected_report(rows, group_by, None, None) == want
        response = await api.admin("GET", "/admin/v1/usage", params={"groupBy": group_by})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["groupBy"] == group_by
        assert _as_dict(body["data"], group_by) == want

        as_csv = await api.admin("GET", "/admin/v1/usage", params={"groupBy": group_by, "format": "csv"})
        assert as_csv.status_code == 200
        assert as_csv.headers["content-type"].startswith("text/csv")
        reader = csv.DictReader(io.StringIO(as_csv.text))
        stored = ["storedBytes"] if group_by == "tenant" else []  # bytes in the output store, per tenant
        assert reader.fieldnames == [group_by, "spentCents", "predictions", *stored]
        assert _as_dict(list(reader), group_by) == want

        accepted = await api.admin(
            "GET", "/admin/v1/usage", params={"groupBy": group_by}, headers={"Accept": "text/csv"}
        )
        assert accepted.headers["content-type"].startswith("text/csv")
        assert accepted.text == as_csv.text

    assert (await api.admin("GET", "/admin/v1/usage")).json()["groupBy"] == "tenant"

    windows = [
        ({"from": "2030-01-11"}, datetime(2030, 1, 11, tzinfo=UTC), None),
        ({"to": "2030-01-10"}, None, datetime(2030, 1, 11, tzinfo=UTC)),
        (
            {"from": "2030-01-10T12:00:00Z", "to": "2030-01-11T11:00:00Z"},
            datetime(2030, 1, 10, 12, tzinfo=UTC),
            datetime(2030, 1, 11, 11, tzinfo=UTC),
        ),
        ({"from": "2030-02-01"}, datetime(2030, 2, 1, tzinfo=UTC), None),
    ]
    for params, start, end in windows:
        for group_by in ("tenant", "day"):
            response = await api.admin("GET", "/admin/v1/usage", params={**params, "groupBy": group_by})
            assert response.status_code == 200, response.text
            assert _as_dict(response.json()["data"], group_by) == _expected_report(rows, group_by, start, end)
    only_second_day = await api.admin("GET", "/admin/v1/usage", params={"from": "2030-01-11", "groupBy": "day"})
    assert _as_dict(only_second_day.json()["data"], "day") == {"2030-01-11": {"spentCents": 39, "predictions": 2}}


@pytest.mark.parametrize(
    ("params", "field"),
    [({"groupBy": "key"}, "groupBy"), ({"format": "xml"}, "format"), ({"from": "last tuesday"}, "from")],
)
async def test_admin_usage_rejects_bad_parameters(api: Api, params: dict[str, str], field: str) -> None:
    response = await api.admin("GET", "/admin/v1/usage", params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert problem["field"] == field
