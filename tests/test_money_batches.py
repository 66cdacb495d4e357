"""A batch of settles or releases costs the same number of SQL statements whatever its size: multi-row
statements and executemany, not a few statements per prediction. And the money still adds up."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event, func, select

from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter, LedgerEntry
from app.budgets.scopes import tenant_scope
from app.core.database import transaction
from app.core.ids import new_id
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import IdempotencyKey, Prediction
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey
from app.tenants.models import Tenant as TenantRow
from app.upstream.schemas import UpstreamSubmitted
from app.upstream.simulator import SimState
from tests.conftest import Api, Tenant, valid_body

MODEL = "ltx-2-19b"
SMALL, LARGE = 1, 12


async def held(
    rt: Runtime, tenant: Tenant, n: int, *, idempotent: bool = True
) -> list[tuple[TenantRow, ApiKey, Any, str | None]]:
    """`n` predictions held in one writer batch, each with an Idempotency-Key unless not `idempotent`."""
    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
        assert tenant_row is not None and key_row is not None
        request = GenerateRequest.model_validate(valid_body())
        fingerprint = predictions_service.request_fingerprint(MODEL, request)
        jobs = [
            predictions_writer.HoldJob(
                tenant_row, key_row, MODEL, request, new_id("pred"), new_id("idem") if idempotent else None, fingerprint
            )
            for _ in range(n)
        ]
        results = await predictions_writer.apply(rt, session, jobs)
    assert not any(isinstance(r, BaseException) for r in results)
    return [(tenant_row, key_row, r, job.idempotency_key) for r, job in zip(results, jobs, strict=True)]


async def statements(rt: Runtime, apply: Callable[[Any], Awaitable[Any]]) -> int:
    """How many statements `apply(session)` runs, in one transaction (not counting the savepoints the
    test databases' sessions open: in production a unit of work is a transaction of its own)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip().upper().startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")):
            seen.append(statement)

    async with transaction(rt.sessions) as session:
        event.listen(rt.engine.sync_engine, "before_cursor_execute", count)
        try:
            await apply(session)
        finally:
            event.remove(rt.engine.sync_engine, "before_cursor_execute", count)
    return len(seen)


def confirm_jobs(batch: list[tuple[TenantRow, ApiKey, Any, str | None]], cost: int) -> list[Any]:
    return [
        predictions_writer.ConfirmJob(
            tenant_row,
            key_row,
            prediction,
            estimate,
            UpstreamSubmitted.model_validate(
                {"id": new_id("up"), "status": "processing", "costCents": cost, "estimatedTime": "5-20s"}
            ),
            idempotency_key,
            "http://gw/api/v1/predictions",
        )
        for tenant_row, key_row, (prediction, estimate), idempotency_key in batch
    ]


async def balance(rt: Runtime, tenant: Tenant) -> tuple[int, int]:
    async with transaction(rt.sessions) as session:
        counter = await session.scalar(select(BudgetCounter).where(BudgetCounter.scope == tenant_scope(tenant.id)))
        assert counter is not None
        return counter.spent_cents, counter.reserved_cents


# The common settle: the tenant has a budget, the vendor's price for the point was seen before, the key has
# no budget of its own and the request no Idempotency-Key. One UPDATE of the predictions' state (fenced on
# "submitting"), one of their charge (app/budgets: each charged only if it never was), the ledger rows,
# one UPDATE of the counters (returning the spent cents the 50/80/100 % lines are checked against) and the
# tenant's day.
COMMON_SETTLE_STATEMENTS = 5


def settling(rt: Runtime, jobs: list[Any], bodies: list[dict[str, Any]]) -> Callable[[Any], Awaitable[None]]:
    async def apply(session: Any) -> None:
        bodies.extend(await predictions_writer.apply(rt, session, jobs))

    return apply


async def test_the_common_settle_costs_five_statements_alone_or_in_a_batch_of_12(api: Api, sim: SimState) -> None:
    rt = api.runtime
    tenant = await api.tenant(budgetCents=100_000)
    first = await held(rt, tenant, 1, idempotent=False)
    await statements(rt, settling(rt, confirm_jobs(first, 11), []))  # the vendor's price is seen from now on
    lone = await held(rt, tenant, 1, idempotent=False)
    batch = await held(rt, tenant, LARGE, idempotent=False)
    assert lone[0][2][1].seen_cents == 11  # nothing left to learn
    bodies: list[dict[str, Any]] = []

    one = await statements(rt, settling(rt, confirm_jobs(lone, 11), bodies))
    many = await statements(rt, settling(rt, confirm_jobs(batch, 11), bodies))

    assert one == COMMON_SETTLE_STATEMENTS, f"a lone settle ran {one} statements"
    assert many == one, f"a settle batch of {LARGE} ran {many} statements, a lone one {one}"
    assert [b["costCents"] for b in bodies] == [11] * (1 + LARGE)
    assert await balance(rt, tenant) == (11 * (2 + LARGE), 0)
    async with transaction(rt.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []


async def test_a_settle_fenced_out_is_not_charged_twice(api: Api, sim: SimState) -> None:
    """The settle's one UPDATE changes and charges only rows still "submitting": a confirm retried after its
    COMMIT landed changes nothing, and one that finds its hold released is charged once, as a late charge."""
    rt = api.runtime
    tenant = await api.tenant(budgetCents=100_000)
    settled, released = await held(rt, tenant, 2, idempotent=False)
    await statements(rt, settling(rt, confirm_jobs([settled], 11), []))
    assert await balance(rt, tenant) == (11, released[2][1].cents)
    release = predictions_writer.ReleaseJob(released[2][0], released[1], "upstream refused", None)
    async with transaction(rt.sessions) as session:
        assert await predictions_writer.apply(rt, session, [release]) == [True]

    upstream_id = (await stored(rt, settled[2][0].id)).upstream_id
    retried = dataclasses.replace(
        confirm_jobs([settled], 11)[0],
        submitted=UpstreamSubmitted.model_validate({"id": upstream_id, "status": "processing", "costCents": 11}),
    )
    bodies: list[dict[str, Any]] = []
    await statements(rt, settling(rt, [retried, *confirm_jobs([released], 13)], bodies))

    assert [b["costCents"] for b in bodies] == [11, 13]
    assert await balance(rt, tenant) == (11 + 13, 0)
    assert (await stored(rt, released[2][0].id)).charged_cents == 13
    async with transaction(rt.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []
        settles = await session.scalars(
            select(LedgerEntry.spent_delta).where(LedgerEntry.tenant_id == tenant.id, LedgerEntry.kind == "settle")
        )
        assert sorted(settles) == [11, 13]


async def stored(rt: Runtime, prediction_id: str) -> Prediction:
    async with transaction(rt.sessions) as session:
        prediction = await session.get(Prediction, prediction_id)
        assert prediction is not None
        return prediction


async def test_a_settle_batch_costs_the_same_statements_for_1_or_12(api: Api, sim: SimState) -> None:
    rt = api.runtime
    # A budget (the batch reads the spent cents back for the 50/80/100 % lines) and a key budget (its
    # counter moves too): the most a settle does, short of crossing a line.
    tenant = await api.tenant(budgetCents=100_000)
    async with transaction(rt.sessions) as session:
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
        assert key_row is not None
        key_row.budget_cents = 50_000
    both = await held(rt, tenant, SMALL + LARGE)  # none has seen a price yet: every settle learns one
    small, large = confirm_jobs(both[:SMALL], 11), confirm_jobs(both[SMALL:], 11)

    bodies: list[dict[str, Any]] = []

    def settle(jobs: list[Any]) -> Callable[[Any], Awaitable[None]]:
        async def apply(session: Any) -> None:
            bodies.extend(await predictions_writer.apply(rt, session, jobs))

        return apply

    one = await statements(rt, settle(small))
    many = await statements(rt, settle(large))

    assert many == one, f"a settle batch of {LARGE} ran {many} statements, a batch of {SMALL} {one}"
    assert [b["status"] for b in bodies] == ["processing"] * (SMALL + LARGE)
    assert all(b["costCents"] == 11 for b in bodies)
    estimate = both[0][2][1].cents
    assert await balance(rt, tenant) == (11 * (SMALL + LARGE), 0)
    async with transaction(rt.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []
        responses = await session.scalars(select(IdempotencyKey.response).where(IdempotencyKey.tenant_id == tenant.id))
        assert sorted(r["id"] for r in responses if r) == sorted(b["id"] for b in bodies)
        kinds = await session.execute(
            select(LedgerEntry.kind, func.sum(LedgerEntry.reserved_delta), func.sum(LedgerEntry.spent_delta))
            .where(LedgerEntry.tenant_id == tenant.id)
            .group_by(LedgerEntry.kind)
            .order_by(LedgerEntry.kind)
        )
        n = SMALL + LARGE
        assert list(kinds) == [("reserve", n * estimate, 0), ("settle", -n * estimate, n * 11)]


async def test_a_release_batch_costs_the_same_statements_for_1_or_12(api: Api, sim: SimState) -> None:
    rt = api.runtime
    tenant = await api.tenant(budgetCents=100_000, maxConcurrent=SMALL + LARGE)
    both = await held(rt, tenant, SMALL + LARGE)
    jobs = [
        predictions_writer.ReleaseJob(prediction, key_row, "upstream refused", idempotency_key)
        for _, key_row, (prediction, _), idempotency_key in both
    ]
    released: list[bool] = []

    def release(batch: list[Any]) -> Callable[[Any], Awaitable[None]]:
        async def apply(session: Any) -> None:
            released.extend(await predictions_writer.apply(rt, session, batch))

        return apply

    one = await statements(rt, release(jobs[:SMALL]))
    many = await statements(rt, release(jobs[SMALL:]))

    assert many == one, f"a release batch of {LARGE} ran {many} statements, a batch of {SMALL} {one}"
    assert released == [True] * (SMALL + LARGE)
    assert await balance(rt, tenant) == (0, 0)
    async with transaction(rt.sessions) as session:
        assert (await session.get(TenantRow, tenant.id, populate_existing=True)).in_flight == 0  # type: ignore[union-attr]
        assert await budgets_service.verify_ledger(session) == []
        keys = await session.scalar(select(func.count()).where(IdempotencyKey.tenant_id == tenant.id))
        assert keys == 0  # a failure is not remembered: the caller may retry with the same key
    # Released once: a second release of the same predictions changes nothing.
    again = await statements(rt, release(jobs[:SMALL]))
    assert released[-SMALL:] == [False] * SMALL and again <= one
    assert await balance(rt, tenant) == (0, 0)
