"""Leases: a worker whose lease expired and was taken over cannot write its stale result."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from app.core import clock
from app.core.database import transaction
from app.predictions import poller
from app.predictions import service as predictions_service
from app.predictions.models import Prediction, PredictionStatus
from app.runtime import Runtime
from app.tenants.models import Tenant
from app.upstream.schemas import UpstreamPrediction
from app.upstream.simulator import SimState
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.models import WebhookAttempt, WebhookDelivery
from tests.conftest import Api, Receiver


def upstream_done(prediction: Prediction, status: str = "completed") -> UpstreamPrediction:
    return UpstreamPrediction.model_validate(
        {
            "id": prediction.upstream_id,
            "status": status,
            "outputs": [f"https://cdn.example.com/{status}.mp4"] if status == "completed" else None,
            "error": "boom" if status == "failed" else None,
        }
    )


async def test_only_one_holder_polls_and_a_stale_holder_cannot_write(
    live_api: Api, live_runtime: Runtime, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url, maxConcurrent=5)
    submitted = (await tenant.submit()).json()
    worker_a = live_runtime
    worker_b = dataclasses.replace(live_runtime, worker_id="worker-b")

    [claimed_a] = await poller.claim_due(worker_a, 10)
    assert claimed_a.id == submitted["id"]
    assert await poller.claim_due(worker_b, 10) == []  # leased: nobody else polls it meanwhile

    clock.shift_to(clock.now() + timedelta(seconds=live_runtime.settings.lease_s + 1))
    [claimed_b] = await poller.claim_due(worker_b, 10)
    assert claimed_b.id == submitted["id"]

    async with transaction(live_runtime.sessions) as session:
        final = predictions_service.final_state(
            claimed_a.id, upstream_done(claimed_a, "failed"), poll_count=claimed_a.poll_count
        )
        stale = await predictions_service.finish_many(session, worker_a, [final], lease_owner=worker_a.worker_id)
    assert stale == {}
    async with transaction(live_runtime.sessions) as session:
        final = predictions_service.final_state(claimed_b.id, upstream_done(claimed_b), poll_count=claimed_b.poll_count)
        fresh = await predictions_service.finish_many(session, worker_b, [final], lease_owner=worker_b.worker_id)
    assert list(fresh) == [claimed_b.id]

    final = (await tenant.get(f"/api/v1/predictions/{submitted['id']}")).json()
    assert final["status"] == "completed" and final["outputs"] == ["https://cdn.example.com/completed.mp4"]
    async with transaction(live_runtime.sessions) as session:
        deliveries = await session.scalar(select(func.count()).select_from(WebhookDelivery))
        tenant_row = await session.get(Tenant, tenant.id)
        assert tenant_row is not None
        assert deliveries == 1
        assert tenant_row.in_flight == 0


async def test_stale_dispatcher_cannot_record_an_attempt(
    live_api: Api, live_runtime: Runtime, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    submitted = (await tenant.submit()).json()
    async with transaction(live_runtime.sessions) as session:
        finishing = predictions_service.Finish(
            submitted["id"],
            PredictionStatus.COMPLETED,
            outputs=["https://cdn.example.com/x.mp4"],
            error=None,
            completed_at=None,
        )
        done = await predictions_service.finish_many(session, live_runtime, [finishing], lease_owner=None)
        assert submitted["id"] in done

    dispatcher_a = Dispatcher(live_runtime)
    dispatcher_b = Dispatcher(dataclasses.replace(live_runtime, worker_id="worker-b"))
    [delivery_a] = await dispatcher_a._claim(10)
    clock.shift_to(clock.now() + timedelta(seconds=live_runtime.settings.webhook_timeout_s + 6))
    [delivery_b] = await dispatcher_b._claim(10)
    assert delivery_a.id == delivery_b.id

    await dispatcher_a._record(delivery_a, 500, None, None, 12)  # A's lease is gone: no effect
    await dispatcher_b._record(delivery_b, 204, None, None, 7)
    async with transaction(live_runtime.sessions) as session:
        row = await session.get(WebhookDelivery, delivery_a.id, populate_existing=True)
        attempts = list(await session.scalars(select(WebhookAttempt)))
    assert row is not None and row.status == "succeeded" and row.attempts == 1
    assert [(a.status_code, a.worker) for a in attempts] == [(204, "worker-b")]


async def test_a_batch_of_terminal_transitions_skips_exactly_the_rows_whose_lease_was_lost(
    live_api: Api, live_runtime: Runtime, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url, maxConcurrent=5)
    ids = [(await tenant.submit()).json()["id"] for _ in range(3)]
    claimed = {p.id: p for p in await poller.claim_due(live_runtime, 10)}
    assert sorted(claimed) == sorted(ids)
    async with transaction(live_runtime.sessions) as session:  # another worker took the last one over
        await session.execute(update(Prediction).where(Prediction.id == ids[2]).values(lease_owner="worker-b"))

    async with transaction(live_runtime.sessions) as session:
        done = await predictions_service.finish_many(
            session,
            live_runtime,
            [predictions_service.final_state(i, upstream_done(claimed[i]), poll_count=1) for i in ids],
            lease_owner=live_runtime.worker_id,
        )
    assert sorted(done) == sorted(ids[:2])
    async with transaction(live_runtime.sessions) as session:
        rows = {p.id: p for p in await session.scalars(select(Prediction).where(Prediction.id.in_(ids)))}
        tenant_row = await session.get(Tenant, tenant.id)
        deliveries = await session.scalar(select(func.count()).select_from(WebhookDelivery))
    assert [rows[i].status for i in ids] == ["completed", "completed", "processing"]
    assert [rows[i].lease_owner for i in ids] == [None, None, "worker-b"]
    assert [rows[i].poll_count for i in ids[:2]] == [1, 1]
    assert tenant_row is not None and tenant_row.in_flight == 1
    assert deliveries == 2
