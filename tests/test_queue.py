"""The fair queue (SPEC §12): submits no provider can take now wait, durably, and are sent by weighted
round robin across tenants when a provider has room.

Asserted on what the simulator received (its submits, in order), on the dispatch order, on the rows and
on the ledger; never on time: where time matters the app clock is moved (app/core/clock.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets import service as budgets_service
from app.budgets.models import LedgerEntry
from app.core import clock
from app.core.database import transaction
from app.predictions.models import Prediction
from app.providers.config import Registry
from app.queue import service as queue_service
from app.queue.dispatcher import QueueDispatcher
from app.queue.models import QueueEntry, QueueState
from app.upstream.simulator import STATE, SimConfig, SimState, start_simulator
from app.webhooks.models import WebhookDelivery
from app.worker import Worker
from tests.conftest import Api, eventually, valid_body
from tests.test_providers_routing import gateway, provider


@pytest.fixture
async def sim() -> AsyncIterator[tuple[str, SimState]]:
    runner, url = await start_simulator(config=SimConfig(completion_s=0.2, estimated_time="0-1s"))
    yield url, runner.app[STATE]
    await runner.cleanup()


def one_provider(url: str, **values: Any) -> Registry:
    return Registry(routing="priority", providers=[provider("vibedream", "vibedream", url, **values)], source="test")


@asynccontextmanager
async def running(api: Api) -> AsyncIterator[Worker]:
    worker = Worker(api.runtime)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def statuses(api: Api) -> dict[str, int]:
    async with transaction(api.runtime.sessions, readonly=True) as session:
        rows = await session.execute(select(Prediction.status, func.count()).group_by(Prediction.status))
        return {status: n for status, n in rows}


async def ledger_ok(api: Api) -> None:
    async with transaction(api.runtime.sessions, readonly=True) as session:
        assert await budgets_service.verify_ledger(session) == []
        reserved = await session.scalar(select(func.coalesce(func.sum(LedgerEntry.reserved_delta), 0)))
        settles = list(
            await session.execute(
                select(LedgerEntry.prediction_id, func.count())
                .where(LedgerEntry.kind == "settle")
                .group_by(LedgerEntry.prediction_id)
            )
        )
    assert reserved == 0
    assert all(n == 1 for _, n in settles), settles


async def deliveries_per_prediction(api: Api) -> dict[str, int]:
    async with transaction(api.runtime.sessions, readonly=True) as session:
        rows = await session.execute(
            select(WebhookDelivery.prediction_id, func.count())
            .where(WebhookDelivery.prediction_id.is_not(None))
            .group_by(WebhookDelivery.prediction_id)
        )
        return {p: n for p, n in rows}


async def test_a_full_provider_queues_the_submit_and_sends_it_when_room_comes(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    async with gateway(engine, database_url, one_provider(url, max_concurrent=1)) as api:
        tenant = await api.tenant(webhookUrl="http://127.0.0.1:9/hook")
        first = await tenant.submit(valid_body())
        assert first.status_code == 200 and "queued" not in first.json(), first.text
        second = await tenant.submit(valid_body())
        assert second.status_code == 200, second.text
        body = second.json()
        assert body["status"] == "processing" and body["queued"] is True
        assert body["costCents"] == 9  # the amount held
        third = await tenant.submit(valid_body())
        assert state.submits == 1  # neither waiting one was sent
        got = (await tenant.get(f"/api/v1/predictions/{third.json()['id']}")).json()
        assert got["status"] == "processing" and got["queued"] is True and got["queuePosition"] == 2
        got = (await tenant.get(f"/api/v1/predictions/{body['id']}")).json()
        assert got["queuePosition"] == 1
        # A caller who wants no wait is refused fast, nothing held.
        refused = await tenant.submit(valid_body(queue=False))
        assert refused.status_code == 503 and refused.json()["code"] == "no_provider_available"
        assert refused.headers["Retry-After"]
        async with running(api):

            async def done() -> bool:
                return (await statuses(api)).get("completed", 0) == 3

            await eventually(done, timeout=60, what="all three completed")
        assert state.submits == 3 and state.max_in_flight <= 1
        got = (await tenant.get(f"/api/v1/predictions/{third.json()['id']}")).json()
        assert "queued" not in got and got["costCents"] == 9
        await ledger_ok(api)
        assert set((await deliveries_per_prediction(api)).values()) == {1}
        await Worker(api.runtime).housekeeping()
        scraped = (await api.admin("GET", "/metrics")).text
        assert f'vidgate_queue_depth{{tenant="{tenant.id}"}} 0.0' in scraped
        assert 'vidgate_queue_wait_seconds_count{outcome="sent"}' in scraped
        assert 'vidgate_queue_dispatches_total{outcome="accepted",provider="vibedream"}' in scraped


async def test_prefer_wait_answers_a_queued_prediction_once_it_completed(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    async with gateway(engine, database_url, one_provider(url, failure_threshold=None)) as api:
        tenant = await api.tenant()
        state.faults.submit_status, state.faults.submit_count = 503, 1  # no provider takes the submit
        async with running(api):
            answer = await tenant.submit(valid_body(), Prefer="wait=30")
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "completed" and body["outputs"], body
        assert "queued" not in body and body["costCents"] == 9 and state.submits == 2


async def test_fairness_one_tenants_backlog_delays_another_by_at_most_one_round(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    # 200 submits at once: above the process's default admission limit, which is not what this shows.
    async with gateway(engine, database_url, one_provider(url, max_concurrent=4), max_inflight_requests=1000) as api:
        a = await api.tenant(name="a", webhookUrl="http://127.0.0.1:9/hook")
        b = await api.tenant(name="b", webhookUrl="http://127.0.0.1:9/hook")
        answers = await asyncio.gather(*(a.submit(valid_body(prompt=f"a {i}")) for i in range(200)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:3]
        b_answers = [await b.submit(valid_body(prompt=f"b {i}")) for i in range(4)]
        assert all(r.json().get("queued") for r in b_answers)  # nobody jumps the queue
        b_ids = {r.json()["id"] for r in b_answers}
        async with running(api) as worker:

            async def done() -> bool:
                return (await statuses(api)).get("completed", 0) == 204

            await eventually(done, timeout=240, what="all 204 completed")
        order = worker.queue.sent
        # From the first dispatch on, B's k-th send comes after at most k of A's: one round each.
        seen_a = 0
        for sent in order:
            if sent in b_ids:
                assert seen_a <= 1, order
                seen_a = 0
            else:
                seen_a += 1
            if all(i in order[: order.index(sent) + 1] for i in b_ids):
                break
        assert b_ids <= set(order)
        assert state.max_in_flight <= 4
        assert state.submits == 204
        await ledger_ok(api)
        per_prediction = await deliveries_per_prediction(api)
        assert len(per_prediction) == 204 and set(per_prediction.values()) == {1}


async def test_an_outage_queues_every_submit_and_sends_each_once_when_it_recovers(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    # No circuit: every dispatch during the outage reaches the 503s, and is put back each time.
    async with gateway(engine, database_url, one_provider(url, failure_threshold=None)) as api:
        tenant = await api.tenant()
        state.faults.submit_status, state.faults.submit_count = 503, 10_000
        answers = await asyncio.gather(*(tenant.submit(valid_body(prompt=f"p {i}")) for i in range(50)))
        assert all(r.status_code == 200 and r.json()["queued"] for r in answers), [r.text for r in answers][:3]
        async with running(api):

            async def some_tried() -> bool:
                return state.submits >= 60

            await eventually(some_tried, timeout=60, what="dispatches during the outage")
            assert (await statuses(api)).get("failed", 0) == 0
            state.faults.submit_count = 0  # recovered

            async def done() -> bool:
                return (await statuses(api)).get("completed", 0) == 50

            await eventually(done, timeout=120, what="all 50 completed")
        assert state.accepted == 50
        await ledger_ok(api)


async def test_a_refusal_at_dispatch_fails_it_and_a_429_puts_it_back(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    async with gateway(engine, database_url, one_provider(url, failure_threshold=None)) as api:
        tenant = await api.tenant(webhookUrl="http://127.0.0.1:9/hook")
        state.faults.submit_status, state.faults.submit_count = 503, 1  # the submit finds no provider
        refused = (await tenant.submit(valid_body(prompt="refused"))).json()
        limited = (await tenant.submit(valid_body(prompt="limited"))).json()
        assert refused["queued"] and limited["queued"] and state.submits == 1
        dispatcher = QueueDispatcher(api.runtime, concurrency=1)  # one send at a time: a known order

        async def dispatch() -> int:
            started = await dispatcher.run_once()
            await asyncio.gather(*dispatcher.tasks)
            return started

        state.faults.submit_status, state.faults.submit_count = 400, 1
        assert await dispatch() == 1
        got = (await tenant.get(f"/api/v1/predictions/{refused['id']}")).json()
        assert got["status"] == "failed" and "400" in got["error"] and got["costCents"] is None
        state.faults.submit_status, state.faults.submit_count, state.faults.submit_retry_after = 429, 1, "30"
        assert await dispatch() == 1
        got = (await tenant.get(f"/api/v1/predictions/{limited['id']}")).json()
        assert got["queued"] and got["queuePosition"] == 1  # back at the head, nothing charged
        assert await dispatch() == 0  # the provider cools down for its Retry-After
        assert state.submits == 3
        clock.shift_to(clock.now() + timedelta(seconds=31))
        assert await dispatch() == 1
        got = (await tenant.get(f"/api/v1/predictions/{limited['id']}")).json()
        assert got["status"] == "processing" and "queued" not in got and got["costCents"] == 9
        assert state.accepted == 1 and dispatcher.sent == [refused["id"], limited["id"], limited["id"]]
        await ledger_ok(api)
        assert (await deliveries_per_prediction(api)) == {refused["id"]: 1}


async def _completed(tenant: Any, prediction_id: str) -> bool:
    got = (await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()
    return bool(got["status"] == "completed")


async def test_max_wait_ends_it_failed_with_the_gateways_message(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    async with gateway(engine, database_url, one_provider(url, max_concurrent=1), queue_max_wait_s=60) as api:
        tenant = await api.tenant(webhookUrl="http://127.0.0.1:9/hook", maxConcurrent=5)
        await tenant.submit(valid_body())
        waiting = (await tenant.submit(valid_body())).json()
        assert waiting["queued"]
        clock.shift_to(clock.now() + timedelta(seconds=61))
        assert await queue_service.expire(api.runtime) == 1
        got = (await tenant.get(f"/api/v1/predictions/{waiting['id']}")).json()
        assert got["status"] == "failed" and "VIDGATE_QUEUE_MAX_WAIT_S" in got["error"]
        assert state.submits == 1
        async with transaction(api.runtime.sessions, readonly=True) as session:
            assert await session.scalar(select(func.count()).select_from(QueueEntry)) == 0
            held = await session.scalar(
                select(func.sum(LedgerEntry.reserved_delta)).where(LedgerEntry.prediction_id == waiting["id"])
            )
            tenant_row = await session.get(__import__("app.tenants.models").tenants.models.Tenant, tenant.id)
        assert held == 0
        assert tenant_row is not None and tenant_row.in_flight == 1  # only the one sent holds its slot
        assert (await deliveries_per_prediction(api)).get(waiting["id"]) == 1


async def test_max_queued_answers_queue_full_and_holds_nothing(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, _ = sim
    async with gateway(engine, database_url, one_provider(url, max_concurrent=1)) as api:
        tenant = await api.tenant(maxQueued=2, budgetCents=1000)
        for _ in range(3):
            assert (await tenant.submit(valid_body())).status_code == 200
        full = await tenant.submit(valid_body())
        assert full.status_code == 429 and full.json()["code"] == "queue_full", full.text
        usage = (await tenant.get("/api/v1/usage")).json()
        # One sent (charged), two waiting (held); the refused one holds nothing.
        assert (usage["spentCents"], usage["reservedCents"]) == (9, 18)
        # Another tenant's queue is its own.
        other = await api.tenant(name="other", maxQueued=1)
        assert (await other.submit(valid_body())).json()["queued"]


async def test_a_queued_prediction_counts_toward_max_concurrent(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, _ = sim
    async with gateway(engine, database_url, one_provider(url, max_concurrent=1)) as api:
        tenant = await api.tenant(maxConcurrent=2)
        assert (await tenant.submit(valid_body())).status_code == 200
        assert (await tenant.submit(valid_body())).json()["queued"]
        third = await tenant.submit(valid_body())
        assert third.status_code == 429 and third.json()["code"] != "queue_full", third.text


async def test_a_dispatch_that_died_mid_send_is_never_sent_again(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    """The claim is committed before the HTTP call; a process killed after it leaves the entry "sending":
    after its lease, recovery fails it, hold released, and nothing sends it a second time."""
    url, state = sim
    async with gateway(engine, database_url, one_provider(url, max_concurrent=2)) as api:
        tenant = await api.tenant(webhookUrl="http://127.0.0.1:9/hook")
        await tenant.submit(valid_body())
        await tenant.submit(valid_body())
        waiting = (await tenant.submit(valid_body())).json()
        assert waiting["queued"]
        async with transaction(api.runtime.sessions) as session:
            # Room at the provider, as when a prediction completes.
            from app.providers.models import ProviderState

            row = await session.get(ProviderState, "vibedream")
            assert row is not None
            row.in_flight -= 1
        dying = QueueDispatcher(api.runtime)
        claim = await dying._claim(set())  # claimed and committed; the process "dies" before sending
        assert claim is not None and claim.prediction.id == waiting["id"]
        submits = state.submits
        survivor = QueueDispatcher(api.runtime)
        assert await survivor.run_once() == 0  # a live lease: neither sent nor failed
        clock.shift_to(clock.now() + timedelta(seconds=survivor.lease_s + 1))
        survivor._looked_at = None
        await survivor.run_once()
        got = (await tenant.get(f"/api/v1/predictions/{waiting['id']}")).json()
        assert got["status"] == "failed" and "never sent again" in got["error"]
        assert state.submits == submits
        async with transaction(api.runtime.sessions, readonly=True) as session:
            held = await session.scalar(
                select(func.sum(LedgerEntry.reserved_delta)).where(LedgerEntry.prediction_id == waiting["id"])
            )
            left = await session.scalar(
                select(func.count()).select_from(QueueEntry).where(QueueEntry.state == QueueState.SENDING)
            )
        assert held == 0 and left == 0


async def test_queue_weight_shares_the_dispatches_and_the_fields_go_through_the_operator_api(
    engine: AsyncEngine, database_url: str, sim: tuple[str, SimState]
) -> None:
    url, state = sim
    async with gateway(engine, database_url, one_provider(url, failure_threshold=None)) as api:
        heavy = await api.tenant(name="heavy", queueWeight=2)
        light = await api.tenant(name="light")
        assert (heavy.data["queueWeight"], heavy.data["maxQueued"]) == (2, 1000)
        assert (light.data["queueWeight"], light.data["maxQueued"]) == (1, 1000)
        bad = await api.admin("PATCH", f"/admin/v1/tenants/{light.id}", json={"queueWeight": 0})
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error", bad.text
        changed = await api.admin("PATCH", f"/admin/v1/tenants/{light.id}", json={"maxQueued": 50})
        assert changed.json()["maxQueued"] == 50 and changed.json()["queueWeight"] == 1
        state.faults.submit_status, state.faults.submit_count = 503, 1  # the first submit finds no provider
        for i in range(6):
            assert (await heavy.submit(valid_body(prompt=f"h {i}"))).json()["queued"]
            assert (await light.submit(valid_body(prompt=f"l {i}"))).json()["queued"]
        dispatcher = QueueDispatcher(api.runtime)
        owners = []
        for _ in range(9):
            claim = await dispatcher._claim(set())  # the order sends would go in (nothing is sent here)
            assert claim is not None
            owners.append(claim.tenant.name)
        # Weighted round robin: two of heavy's for each of light's, interleaved.
        assert owners.count("heavy") == 6 and owners.count("light") == 3, owners
        assert all(owners[i : i + 3].count("heavy") == 2 for i in range(0, 9, 3)), owners
