"""The dispatcher stores a batch of delivery outcomes with one UPDATE for all of them, fenced on its
lease, and one attempt row per delivery."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from sqlalchemy import event, select
from standardwebhooks.webhooks import Webhook

from app.core import clock
from app.core.database import transaction
from app.predictions import service as predictions_service
from app.predictions.models import PredictionStatus
from app.runtime import Runtime
from app.webhooks.dispatcher import Attempt, Dispatcher
from app.webhooks.models import WebhookAttempt, WebhookDelivery
from tests.conftest import Api, Receiver


async def test_a_batch_of_outcomes_is_one_update(live_api: Api, live_runtime: Runtime, receiver_factory: Any) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    for _ in range(3):
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
    dispatcher = Dispatcher(live_runtime)
    claimed = await dispatcher._claim(10)
    assert len(claimed) == 3
    now = clock.now()
    ok, failed, gone = claimed
    batch = [
        Attempt(ok, now, 204, None, None, 5),
        Attempt(failed, now, 500, None, None, 6),
        Attempt(gone, now, 410, None, None, 7),
        Attempt(ok, now, 500, None, None, 8),  # the same delivery again: its lease went with the first
    ]
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "UPDATE webhook_deliveries" in statement:
            updates.append(statement)

    event.listen(live_runtime.engine.sync_engine, "before_cursor_execute", count)
    try:
        await dispatcher.record(batch)
    finally:
        event.remove(live_runtime.engine.sync_engine, "before_cursor_execute", count)
    assert len(updates) == 1

    async with transaction(live_runtime.sessions, readonly=True) as session:
        rows = {d.id: d for d in await session.scalars(select(WebhookDelivery))}
        attempts = sorted((a.delivery_id, a.status_code) for a in await session.scalars(select(WebhookAttempt)))
    assert (rows[ok.id].status, rows[ok.id].attempts, rows[ok.id].lease_owner) == ("succeeded", 1, None)
    assert (rows[failed.id].status, rows[failed.id].last_status_code) == ("pending", 500)
    assert rows[failed.id].next_attempt_at is not None and rows[failed.id].lease_owner is None
    assert rows[gone.id].status == "dead"
    assert attempts == sorted([(ok.id, 204), (failed.id, 500), (gone.id, 410)])


async def test_a_claim_and_its_signing_secrets_are_one_transaction(
    live_api: Api, live_runtime: Runtime, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenants = [await live_api.tenant(webhookUrl=receiver.url) for _ in range(2)]
    secret_of: dict[str, str] = {}
    for tenant in tenants:
        submitted = (await tenant.submit()).json()
        secret_of[submitted["id"]] = tenant.data["webhookSecret"]
        async with transaction(live_runtime.sessions) as session:
            finishing = predictions_service.Finish(
                submitted["id"], PredictionStatus.FAILED, outputs=None, error="boom", completed_at=None
            )
            await predictions_service.finish_many(session, live_runtime, [finishing], lease_owner=None)
    dispatcher = Dispatcher(live_runtime)
    commits: list[int] = []

    def commit(_conn: Any) -> None:
        commits.append(1)

    event.listen(live_runtime.engine.sync_engine, "commit", commit)
    try:
        # The dispatcher claims each time slots free up: one transaction for that, not two.
        assert await dispatcher.run_once() == 2
    finally:
        event.remove(live_runtime.engine.sync_engine, "commit", commit)
    assert len(commits) == 1
    for _ in tenants:
        # Each delivery signed with its own tenant's secret.
        arrived = await receiver.next()
        prediction_id = orjson.loads(arrived.body)["data"]["id"]
        verified = Webhook(secret_of[prediction_id]).verify(arrived.body, arrived.headers)
        assert verified["type"] == "prediction.failed"
    await asyncio.gather(*dispatcher.tasks)
