"""A submit whose caller goes away, and a writer batch that fails (issue 24 C2): the hold and the
Idempotency-Key of a cancelled submit come back at once, not submit_recovery_s later; a batch that
fails for one job's sake is retried job by job, so only that job's caller fails."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from app.budgets.models import LedgerEntry
from app.core.database import transaction
from app.core.ids import new_id
from app.predictions import failover
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction
from app.predictions.schemas import GenerateRequest
from app.tenants.models import ApiKey
from app.tenants.models import Tenant as TenantRow
from app.upstream.simulator import SimState
from tests.conftest import Api, valid_body
from tests.test_budgets import MODEL, PRICE, in_flight, ledger_of, mismatches, usage


async def test_a_submit_cancelled_during_the_upstream_call_gives_its_hold_and_key_back(api: Api, sim: SimState) -> None:
    rt = api.runtime
    tenant = await api.tenant(budgetCents=100, maxConcurrent=1)
    sim.faults.submit_arrived = asyncio.Event()
    sim.faults.submit_gate = asyncio.Event()
    client = asyncio.create_task(tenant.submit(**{"Idempotency-Key": "gone"}))
    await sim.faults.submit_arrived.wait()  # the hold is committed; the upstream call is in flight

    assert ((await usage(tenant))["reservedCents"], await in_flight(rt, tenant.id)) == (PRICE, 1)
    busy = await tenant.submit(**{"Idempotency-Key": "gone"})
    assert (busy.status_code, busy.json()["code"]) == (409, "idempotency_key_in_flight")

    client.cancel()  # the client goes away (in process, its cancellation reaches the request's task)
    await asyncio.wait([client])
    assert client.cancelled()

    now = await usage(tenant)
    assert (now["spentCents"], now["reservedCents"]) == (0, 0)
    assert await in_flight(rt, tenant.id) == 0
    async with transaction(rt.sessions) as session:
        (row,) = await session.scalars(select(Prediction).where(Prediction.tenant_id == tenant.id))
    assert (row.status, row.error) == ("rejected", predictions_writer.ABANDONED)
    assert await ledger_of(rt, row.id) == [("reserve", PRICE, 0), ("release", -PRICE, 0)]

    sim.faults.submit_gate.set()
    again = await tenant.submit(**{"Idempotency-Key": "gone"})
    assert again.status_code == 200, again.text
    assert "idempotent-replayed" not in again.headers and again.json()["id"] != row.id
    assert (await usage(tenant))["spentCents"] == PRICE
    assert await mismatches(rt) == []


async def test_a_hold_committed_for_a_caller_gone_meanwhile_is_given_back(live_api: Api, sim: SimState) -> None:
    """The caller is cancelled while the writer's batch holding for it runs: the batch commits the hold
    all the same (one transaction), and the writer hands it back at once."""
    rt = live_api.runtime
    tenant = await live_api.tenant(budgetCents=100, maxConcurrent=1)
    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
    assert tenant_row is not None and key_row is not None
    writer = predictions_writer._writer(rt)
    started, gate = asyncio.Event(), asyncio.Event()
    apply = writer._apply

    async def slow_apply(jobs: list[object]) -> list[object]:
        started.set()
        await gate.wait()
        return await apply(jobs)

    writer._apply = slow_apply
    try:
        request = GenerateRequest.model_validate(valid_body())
        caller = asyncio.create_task(
            failover.submit(
                rt, tenant_row, key_row, MODEL, request, idempotency_key="gone", status_url_base="http://gw/p"
            )
        )
        await started.wait()
        caller.cancel()
        await asyncio.wait([caller])
        gate.set()
        runner = writer._runner
        assert runner is not None
        await runner  # the batch, committed
        releases = predictions_writer._releasing
        while releases:  # the release the writer started for the abandoned hold
            await asyncio.wait(set(releases))
    finally:
        writer._apply = apply
    assert caller.cancelled()
    assert ((await usage(tenant))["reservedCents"], await in_flight(rt, tenant.id)) == (0, 0)
    again = await tenant.submit(**{"Idempotency-Key": "gone"})
    assert again.status_code == 200, again.text
    assert sim.submits == 1
    assert await mismatches(rt) == []


async def test_a_failed_batch_is_retried_job_by_job(api: Api, sim: SimState) -> None:
    """Two holds with one prediction id (a bug's stand-in: any error one job brings) fail their batch's
    INSERT together. Retried one by one, the first is held and only the second's caller gets the error;
    the failed batch left nothing behind."""
    rt = api.runtime
    tenant = await api.tenant(budgetCents=100)
    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
    assert tenant_row is not None and key_row is not None
    request = GenerateRequest.model_validate(valid_body())
    prediction_id = new_id("pred")
    jobs = [
        predictions_writer.HoldJob(tenant_row, key_row, MODEL, request, prediction_id, None, ""),
        predictions_writer.HoldJob(tenant_row, key_row, MODEL, request, prediction_id, None, ""),
        predictions_writer.HoldJob(tenant_row, key_row, MODEL, request, new_id("pred"), None, ""),
    ]
    results = await predictions_writer._in_transactions(rt, jobs)

    assert isinstance(results[0], tuple) and results[0][0].id == prediction_id
    assert isinstance(results[1], Exception) and not isinstance(results[1], predictions_service.AppError)
    assert isinstance(results[2], tuple)
    assert (await usage(tenant))["reservedCents"] == 2 * PRICE
    async with transaction(rt.sessions) as session:
        reserves = await session.scalar(
            select(func.count()).where(LedgerEntry.tenant_id == tenant.id, LedgerEntry.kind == "reserve")
        )
    assert reserves == 2
    assert await mismatches(rt) == []
